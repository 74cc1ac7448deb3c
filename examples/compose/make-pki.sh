#!/bin/sh
# The compose federation's one-shot PKI step: a CA and one certificate per party,
# each party's into its own volume. Does nothing when the CA already exists, so
# `docker compose up` can run again over the same volumes.
set -eu
PKI=/srv/pki
if [ -f "$PKI/ca/ca.key" ]; then
    echo "CA exists in $PKI/ca; keeping every certificate"
    exit 0
fi
fedpriv pki init --dir "$PKI/ca" --federation digits
fedpriv pki issue coordinator --server --host coordinator --host localhost --dir "$PKI/ca" \
    --out "$PKI/coordinator"
# The operator's certificate sits with the coordinator: its healthcheck and
# `docker compose exec coordinator fedpriv status ...` use it.
fedpriv pki issue ops --client --dir "$PKI/ca" --out "$PKI/coordinator"
cp "$PKI/ca/ca.crt" "$PKI/coordinator/ca.crt"
for silo in silo-1 silo-2 silo-3; do
    fedpriv pki issue "$silo" --client --dir "$PKI/ca" --out "$PKI/$silo"
    cp "$PKI/ca/ca.crt" "$PKI/$silo/ca.crt"
done
echo "issued certificates for coordinator, ops, silo-1, silo-2, silo-3"
