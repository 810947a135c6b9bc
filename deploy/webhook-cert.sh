#!/usr/bin/env bash
# The injector's TLS key pair, for clusters without cert-manager.
#
#   deploy/webhook-cert.sh OUTDIR
#
# writes OUTDIR/tls.crt and OUTDIR/tls.key (the Secret outrider-injector-tls)
# and OUTDIR/ca.pem (the webhook's caBundle). The certificate names the
# injector's Service, outrider-injector.outrider-system.svc, and lasts a
# year. The CA key that signed it is deleted on exit: to renew, run this
# again and replace both the Secret and the caBundle (docs/install.md).
set -euo pipefail

out=${1:?usage: $0 OUTDIR}
name=outrider-injector.outrider-system.svc
days=365
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -subj "/CN=outrider-injector webhook CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign" \
    -keyout "$work/ca.key" -out "$out/ca.pem"

openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=$name" -keyout "$out/tls.key" -out "$work/tls.csr"

cat >"$work/ext.cnf" <<EXT
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:$name
EXT
openssl x509 -req -in "$work/tls.csr" -CA "$out/ca.pem" -CAkey "$work/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -extfile "$work/ext.cnf" \
    -out "$out/tls.crt"
chmod 600 "$out/tls.key"
echo "wrote $out/tls.crt, $out/tls.key (Secret outrider-injector-tls) and $out/ca.pem (caBundle)"
