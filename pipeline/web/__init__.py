"""What viewers and operators see: the static pages and the dashboard's JSON query API."""
