"""Sans-I/O core: no Kafka, no Redis, no sockets; unit- and property-tested alone."""
