#!/bin/sh
# The role metabatch connects as, made once when the postgres image
# initialises its volume (it runs the files of /docker-entrypoint-initdb.d as
# the superuser, over the container's socket). README, "Postgres", says why:
# the service's statements run as the owner of its tables, not as a superuser;
# it migrates them itself, as that owner. The superuser's password goes: it
# keeps the socket's trust login inside the container, and no login over the
# network.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v password="$POSTGRES_PASSWORD" -v superuser="$POSTGRES_USER" <<'SQL'
CREATE ROLE metabatch LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
CREATE DATABASE metabatch OWNER metabatch;
ALTER ROLE :"superuser" PASSWORD NULL;
SQL
