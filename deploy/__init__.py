"""Cluster packaging, the spark-submit wrapper, the standalone-cluster test, the Airflow DAG."""
