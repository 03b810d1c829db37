#!/bin/bash
# Run once by the postgres image on an empty data directory (/docker-entrypoint-initdb.d):
# creates the demo product database that cdc captures, with sql/product/schema.sql (mounted
# at /feedloop/product-schema.sql by deploy/compose.yaml). The control database (feedloop) is
# POSTGRES_DB; the services migrate it themselves at start.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -c 'CREATE DATABASE product'
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname product -f /feedloop/product-schema.sql
