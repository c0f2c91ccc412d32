-- The basic-auth app keeps users and permissions in its own database next to the tracking store.
CREATE DATABASE mlflow_auth;
