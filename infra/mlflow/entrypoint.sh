#!/bin/sh
# Starts `mlflow server` with basic auth, a PostgreSQL backend and proxied S3 artifacts, from the
# environment only (docker-compose.yaml passes it from .env): no secret is written into an image or
# a file in git. The auth config file is generated here, readable only by this user.
set -eu
: "${POSTGRES_USER:?}" "${POSTGRES_PASSWORD:?}" "${POSTGRES_HOST:?}" "${POSTGRES_DB:?}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?}" "${MLFLOW_ALLOWED_HOSTS:?}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?}" "${MLFLOW_AUTH_ADMIN_PASSWORD:?}" "${MLFLOW_FLASK_SERVER_SECRET_KEY:?}"
pg="postgresql://${POSTGRES_USER}:${POSTGRES_PASSWORD}@${POSTGRES_HOST}:5432"
export MLFLOW_BACKEND_STORE_URI="${pg}/${POSTGRES_DB}"

umask 077
export MLFLOW_AUTH_CONFIG_PATH="${HOME}/basic_auth.ini"
cat > "${MLFLOW_AUTH_CONFIG_PATH}" <<INI
[mlflow]
# new users may read everything and change nothing until an admin grants more
default_permission = READ
database_uri = ${pg}/${POSTGRES_AUTH_DB:-mlflow_auth}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
# (the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD; it only seeds the first start)

exec mlflow server \
  --host 0.0.0.0 --port 5000 --workers "${MLFLOW_WORKERS:-4}" \
  --app-name basic-auth \
  --serve-artifacts --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION}" \
  --allowed-hosts "${MLFLOW_ALLOWED_HOSTS}" \
  --cors-allowed-origins "${MLFLOW_CORS_ALLOWED_ORIGINS:-https://${MLFLOW_ALLOWED_HOSTS%%,*}}" \
  --x-frame-options DENY
