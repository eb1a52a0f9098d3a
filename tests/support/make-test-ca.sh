#!/bin/sh
# tests/support/make-test-ca.sh DIR: make a throwaway certificate authority
# and a server certificate it signed, for TLS tests on loopback.
#
# Writes into DIR (created if missing):
#   ca.crt, ca.key          self-signed CA (P-256), valid 30 days
#   server.crt, server.key  server certificate for IP 127.0.0.1 and DNS
#                           localhost, signed by the CA
# Clients verify with the CA file, e.g. `curl --cacert DIR/ca.crt`.
# Never use these keys outside tests.
set -eu
if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
dir=$1
mkdir -p "$dir"
cd "$dir"
umask 077
# openssl chats on stderr even when it works: show it only on failure.
quiet() {
    "$@" 2>openssl.log || { cat openssl.log >&2; exit 1; }
}
quiet openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout ca.key -out ca.crt -days 30 -subj "/CN=costrouter test CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"
quiet openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout server.key -out server.csr -subj "/CN=localhost"
cat > server.ext <<'EXT'
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
EXT
quiet openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out server.crt -days 30 -extfile server.ext
rm -f server.csr server.ext ca.srl openssl.log
chmod 644 ca.crt server.crt
