"""The pipeline audit (``ohs audit``): the journal, Kafka and Cassandra checked against each other."""
