"""`silotune pki`: the federation's CA, the coordinator's certificate, organizations' keys.

  silotune pki init        --dir pki [--days N]                  CA key (0600) + self-signed CA cert
  silotune pki server-cert --dir pki --host H [--host H2 ...]    coordinator TLS key + cert (SANs)
  silotune pki org-key     --dir keys --name ORG                 an organization's node key pair
  silotune pki operator-cert --dir pki --name NAME [--out DIR]   an operator's client certificate (mTLS)
  silotune pki enroll      --coordinator-dir DIR --name ORG --public-key ORG.pub
  silotune pki revoke      --coordinator-dir DIR --name ORG
  silotune pki list        --coordinator-dir DIR
  silotune pki app-key     --dir pki                             the federation's app-publisher key pair
  silotune pki sign-app    --key pki/publisher.key --app-dir .   sign the app folder (silotune-app.sig.json)

Who runs what: the coordinator's operator runs init and server-cert, and hands
`pki/ca.pem` to every organization; each organization runs org-key, keeps
ORG.key and sends ORG.pub to the operator, who enrolls it (at start with
`silotune coordinator --enroll ORG=ORG.pub`, or later with `pki enroll`
against the running coordinator: enrollment registers the key with the live
SuperLink, see server/enrollment.py). `pki revoke` removes an organization;
its agent is disconnected at its next heartbeat.

operator-cert is for the coordinator's operator only (never for an
organization): a client certificate signed by the CA, EKU clientAuth, that
the coordinator's operator listener (`silotune coordinator --operator-port`)
demands in the TLS handshake before it forwards anything to the Control API.
On the coordinator host the operator needs none: `pki enroll/revoke/list` and
the `flwr` CLI dial the SuperLink over loopback.
"""

from __future__ import annotations

import argparse

from runtime.console import console

DEFAULT_COORDINATOR_DIR = "runs/coordinator"  # = `silotune coordinator --state-dir` default


def register(commands: argparse._SubParsersAction) -> None:
    pki = commands.add_parser("pki", help="CA, coordinator certificate, organization keys, enrollment",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = pki.add_subparsers(dest="pki_command", required=True)

    p = sub.add_parser("init", help="create the federation's CA (ca.key, ca.pem)")
    p.add_argument("--dir", required=True, help="PKI directory (created if missing)")
    p.add_argument("--days", type=int, default=3650, help="CA validity in days (default 3650)")
    p.add_argument("--force", action="store_true", help="replace an existing CA (invalidates every certificate)")
    p.set_defaults(handler=init)

    p = sub.add_parser("server-cert", help="issue the coordinator's TLS certificate (server.key, server.pem)")
    p.add_argument("--dir", required=True, help="PKI directory holding the CA")
    p.add_argument("--host", dest="hosts", action="append", default=[], metavar="HOST",
                   help="a name or IP address agents dial (repeat); 127.0.0.1 and localhost are always added")
    p.add_argument("--days", type=int, default=397, help="validity in days (default 397)")
    p.add_argument("--force", action="store_true", help="replace an existing server certificate")
    p.set_defaults(handler=server_cert)

    p = sub.add_parser("org-key", help="create an organization's node key pair (ORG.key, ORG.pub)")
    p.add_argument("--dir", required=True, help="where to write the keys (stays in the organization)")
    p.add_argument("--name", required=True, help="organization name")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    p.set_defaults(handler=org_key)

    p = sub.add_parser("operator-cert",
                       help="issue an operator's client certificate for the operator listener (mutual TLS)")
    p.add_argument("--dir", required=True, help="PKI directory holding the CA")
    p.add_argument("--name", required=True, help="operator name (becomes the certificate's CN)")
    p.add_argument("--out", help="where to write operator-NAME.pem/.key (default: --dir)")
    p.add_argument("--days", type=int, default=90, help="validity in days (default 90; there is no revocation list)")
    p.add_argument("--force", action="store_true", help="replace an existing operator certificate")
    p.set_defaults(handler=operator_cert)

    p = sub.add_parser("app-key", help="create the federation's app-publisher key pair (publisher.key, .pub)")
    p.add_argument("--dir", required=True, help="where to write the keys (publisher.key stays with the signer)")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    p.set_defaults(handler=app_key)

    p = sub.add_parser("sign-app", help="sign the app folder: the files its bundle will hold (silotune-app.sig.json)")
    p.add_argument("--key", required=True, help="the federation's publisher.key (from `silotune pki app-key`)")
    p.add_argument("--app-dir", default=".", help="the Flower App folder (default: .)")
    p.set_defaults(handler=sign_app)

    p = sub.add_parser("enroll", help="register an organization's public key with a running coordinator")
    p.add_argument("--coordinator-dir", default=DEFAULT_COORDINATOR_DIR,
                   help=f"the coordinator's --state-dir (default {DEFAULT_COORDINATOR_DIR})")
    p.add_argument("--name", required=True, help="organization name")
    p.add_argument("--public-key", required=True, help="the organization's ORG.pub")
    p.set_defaults(handler=enroll)

    p = sub.add_parser("revoke", help="unregister an organization from a running coordinator")
    p.add_argument("--coordinator-dir", default=DEFAULT_COORDINATOR_DIR,
                   help=f"the coordinator's --state-dir (default {DEFAULT_COORDINATOR_DIR})")
    p.add_argument("--name", required=True, help="organization name")
    p.set_defaults(handler=revoke)

    p = sub.add_parser("list", help="organizations enrolled with a coordinator")
    p.add_argument("--coordinator-dir", default=DEFAULT_COORDINATOR_DIR,
                   help=f"the coordinator's --state-dir (default {DEFAULT_COORDINATOR_DIR})")
    p.add_argument("--all", action="store_true", help="include revoked organizations")
    p.set_defaults(handler=list_enrolled)


def init(args: argparse.Namespace) -> int:
    from runtime.keys import load_certificate
    from server.pki import init_ca

    files = init_ca(args.dir, days=args.days, force=args.force)
    cert = load_certificate(files.cert)
    console.print(f"CA certificate {files.cert} (valid until {cert.not_valid_after_utc:%Y-%m-%d}); "
                  f"give it to every organization")
    console.print(f"CA private key {files.key} (mode 0600): keep it offline; needed only to issue certificates")
    return 0


def server_cert(args: argparse.Namespace) -> int:
    from server.pki import issue_server_cert

    files, sans = issue_server_cert(args.dir, args.hosts, days=args.days, force=args.force)
    console.print(f"server certificate {files.cert} for {', '.join(sans)}")
    console.print(f"server private key {files.key} (mode 0600)")
    console.print(f"start the coordinator with: silotune coordinator --pki-dir {files.cert.parent} ...")
    return 0


def operator_cert(args: argparse.Namespace) -> int:
    from runtime.keys import load_certificate
    from server.pki import issue_operator_cert

    files = issue_operator_cert(args.dir, args.name, days=args.days, out_dir=args.out, force=args.force)
    cert = load_certificate(files.cert)
    console.print(f"operator certificate {files.cert} for {files.name} "
                  f"(client authentication only, valid until {cert.not_valid_after_utc:%Y-%m-%d})")
    console.print(f"operator private key {files.key} (mode 0600): give both only to that operator, never to "
                  f"an organization; with {files.ca_cert} they open the coordinator's --operator-port")
    return 0


def org_key(args: argparse.Namespace) -> int:
    from runtime.keys import create_org_key

    files = create_org_key(args.dir, args.name, force=args.force)
    console.print(f"private key {files.private_key} (mode 0600): stays here; "
                  f"silotune agent start --private-key {files.private_key}")
    console.print(f"public key fingerprint {files.fingerprint}: send the public key to the coordinator's operator")
    print(files.public_key)  # plain last line: the public key path, for scripts
    return 0


def app_key(args: argparse.Namespace) -> int:
    from runtime.app_signature import create_publisher_key

    files = create_publisher_key(args.dir, force=args.force)
    console.print(f"app publisher private key {files.private_key} (mode 0600): stays with whoever signs the app; "
                  f"silotune pki sign-app --key {files.private_key} --app-dir APP")
    console.print(f"app publisher public key {files.public_key}, fingerprint {files.fingerprint}: give it to every "
                  f"organization (silotune agent start --app-publisher-key {files.public_key.name})")
    return 0


def sign_app(args: argparse.Namespace) -> int:
    from runtime.app_signature import sign_app as do_sign

    path, signature = do_sign(args.app_dir, args.key)
    console.print(f"signed {len(signature.files)} files of the app's bundle with publisher key "
                  f"{signature.key_fingerprint}: {path} (sign again after any change to the folder)")
    return 0


def enroll(args: argparse.Namespace) -> int:
    from server.enrollment import enroll as do_enroll

    row = do_enroll(args.coordinator_dir, args.name, args.public_key)
    console.print(f"enrolled {row.name}: node {row.node_id}, key {row.fingerprint}")
    return 0


def revoke(args: argparse.Namespace) -> int:
    from server.enrollment import revoke as do_revoke

    row = do_revoke(args.coordinator_dir, args.name)
    console.print(f"revoked {row.name}: node {row.node_id} can no longer connect")
    return 0


def list_enrolled(args: argparse.Namespace) -> int:
    from server.enrollment import enrollments

    rows = enrollments(args.coordinator_dir, include_revoked=args.all)
    if not rows:
        console.print("no organizations enrolled")
    for row in rows:
        state = f"revoked {row.revoked_at}" if row.revoked_at else f"enrolled {row.enrolled_at}"
        console.print(f"{row.name}\tnode {row.node_id}\t{row.fingerprint}\t{state}")
    return 0
