#!/bin/sh
# Make a throw-away test CA and a server certificate for the broker's TLS listener.
#
#   broker/make-test-certs.sh DIR            # writes DIR/ca.crt ca.key server.crt server.key
#   DAYS=30 HOSTS="broker.lan 10.0.0.5" broker/make-test-certs.sh DIR
#
# The server certificate names localhost and 127.0.0.1 (plus HOSTS: names or IPv4/IPv6 addresses) in its
# subjectAltName, which is what clients verify. Clients get only ca.crt (e.g. `edgecascade cloud --tls-ca
# DIR/ca.crt`). For tests and staging only: a production broker uses certificates from the site's own CA.
# Existing files are kept unless FORCE=1.
set -eu

dir=${1:?usage: make-test-certs.sh DIR}
days=${DAYS:-825}
hosts=${HOSTS:-}

mkdir -p "$dir"
if [ -e "$dir/ca.key" ] && [ "${FORCE:-0}" != 1 ]; then
    echo "make-test-certs: $dir/ca.key exists; set FORCE=1 to replace" >&2
    exit 1
fi
command -v openssl >/dev/null || { echo "make-test-certs: openssl not found" >&2; exit 1; }

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for h in $hosts; do
    case "$h" in
        *[!0-9.]*) case "$h" in *:*) san="$san,IP:$h" ;; *) san="$san,DNS:$h" ;; esac ;;
        *) san="$san,IP:$h" ;;
    esac
done

umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# CA: the extensions strict verifiers (Python >= 3.13 VERIFY_X509_STRICT) insist on.
openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days "$days" \
    -subj "/O=edgecascade test/CN=edgecascade test CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" 2>/dev/null

openssl req -new -newkey rsa:2048 -nodes -sha256 \
    -subj "/O=edgecascade test/CN=localhost" \
    -keyout "$dir/server.key" -out "$tmp/server.csr" 2>/dev/null

cat >"$tmp/server.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
EXT

openssl x509 -req -sha256 -days "$days" -in "$tmp/server.csr" \
    -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -CAserial "$tmp/ca.srl" \
    -extfile "$tmp/server.ext" -out "$dir/server.crt" 2>/dev/null

chmod 644 "$dir/ca.crt" "$dir/server.crt"
chmod 600 "$dir/ca.key" "$dir/server.key"
openssl verify -CAfile "$dir/ca.crt" "$dir/server.crt" >/dev/null
echo "test CA and server certificate ($san) in $dir"
