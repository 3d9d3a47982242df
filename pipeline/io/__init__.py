"""The only modules that talk to Kafka and Redis."""
