#!/usr/bin/env bash
# Installs everything bulkhead needs on a fresh Debian 12 machine (run as root):
# system packages, a virtualenv with pinned Python dependencies in ./.venv, the `bulkhead` command
# in /usr/local/bin, and the demo guest (built once with gcc and cached).
set -euo pipefail
cd "$(dirname "$0")"
STEP=0
STEPS=9
step() { STEP=$((STEP + 1)); echo "install.sh: [$STEP/$STEPS] $*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (it installs system packages and /usr/local/bin/bulkhead)" >&2
  exit 1
fi

PACKAGES=(
  gcc binutils make libc6-dev linux-libc-dev   # guest payloads and the KVM header checks
  python3 python3-venv python3-dev              # the VMM itself
  qemu-system-x86                               # the side-by-side peer in tests and benchmarks
  swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config  # TPM (tpm2-pytss builds against libtss2) for measured launch and attestation
  libseccomp2 libseccomp-dev                    # seccomp allow-lists for the jailed workers
  iproute2 nftables dnsmasq-base iperf3         # taps, bridges, filtering, DHCP per network; iperf3: bench
  wireguard-go wireguard-tools                  # the cross-host overlay: userspace WireGuard where the kernel has no module, and wg
  busybox-static cpio xz-utils                  # initramfs for Linux boot tests
  strace                                        # tests: FLUSH must reach the image as fdatasync
  acpica-tools                                  # tests: iasl disassembles the generated ACPI tables
  etcd-server etcd-client                       # the fleet's store (docs/FLEET.md); tests run their own cluster
  nodejs npm                                    # the web console's pinned front-end packages (ui/package-lock.json: npm ci)
  chromium chromium-driver                      # tests: the web console end to end in headless Chromium (docs/UI.md)
  libnss3-tools                                 # tests: certutil/pk12util put a client certificate in Chromium's NSS db
)
export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "${PACKAGES[@]}"; do
  case "$p" in  # a Node.js that already brings npm (NodeSource's nodejs conflicts with Debian's npm) is enough
    nodejs|npm) if command -v node >/dev/null && command -v npm >/dev/null; then continue; fi ;;
  esac
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
step "system packages"
if [ ${#missing[@]} -gt 0 ]; then
  echo "install.sh: installing ${#missing[@]} system packages: ${missing[*]}"
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
else
  echo "install.sh: all ${#PACKAGES[@]} system packages present"
fi
# Debian's etcd-server enables and starts a system etcd on 127.0.0.1:2379. bulkhead never uses it (a fleet
# runs the etcd cluster its operator configures; tests start their own): stop and disable it, so it holds
# no port and no data dir nobody asked for.
if [ -e /lib/systemd/system/etcd.service ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now etcd.service >/dev/null 2>&1 || true
elif [ -x /etc/init.d/etcd ]; then
  /etc/init.d/etcd stop >/dev/null 2>&1 || true
  update-rc.d etcd disable >/dev/null 2>&1 || true
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install.sh: bulkhead needs Python >= 3.11 ($PY is $("$PY" --version 2>&1))" >&2
  exit 1
fi
step "Python virtualenv (.venv) and pinned dependencies"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install --progress-bar on --upgrade pip
.venv/bin/pip install --progress-bar on -e '.[mgmt,dev,fuzz,api-test]'
step "web console front-end packages (ui/package-lock.json, pinned; docs/UI.md)"
# npm ci installs exactly the lock file's versions into ui/node_modules, which the daemon serves under
# /ui/static (bulkhead.daemon.ui.vendor_dir); nothing is copied into the repository and nothing is built.
npm ci --prefix ui --no-audit --no-fund --ignore-scripts
step "bytecode and the launchers /usr/local/bin/bulkhead, bulkheadd"
# The launchers run Python with -I -S -B and go through bulkhead/_boot.py (docs/INTEGRITY.md): the signed
# manifest and every file of the package are verified BEFORE any bulkhead module is imported, and imports
# then come only from the verified tree. No site processing (it costs ~10 ms of every VM start): the site
# directories are written into the launcher. The text comes from bulkhead._boot.launcher_text (tested).
# Cached bytecode made now is recorded in the manifest (`manifest build --bytecode`); the gate runs a .pyc
# only when its digest is listed, so starts need not recompile, and a planted .pyc is never executed.
.venv/bin/python -m compileall -q src/bulkhead >/dev/null
for name in bulkhead bulkheadd; do
  .venv/bin/python -c 'import sys; from bulkhead._boot import write_launcher; write_launcher(sys.argv[1], sys.argv[2])' \
      "/usr/local/bin/$name" "$name"
done

# Sign a manifest of the installed code (docs/INTEGRITY.md): the daemon and every jailed worker verify the
# files against it before they run. The release key is made here and its private half discarded, so no key on
# this host can re-sign modified code. After changing the code, run ./install.sh again.
step "signed code manifest /etc/bulkhead/manifest.json"
install -d -m 0755 /etc/bulkhead
KEYDIR=$(mktemp -d)
trap 'rm -rf "$KEYDIR"' EXIT
.venv/bin/python -m bulkhead manifest keygen "$KEYDIR/release" >/dev/null
.venv/bin/python -B -m bulkhead manifest build --bytecode --extra /usr/local/bin/bulkhead --extra /usr/local/bin/bulkheadd \
    -o "$KEYDIR/manifest.unsigned.json" >/dev/null
.venv/bin/python -m bulkhead manifest sign "$KEYDIR/manifest.unsigned.json" --key "$KEYDIR/release.key" \
    -o /etc/bulkhead/manifest.json >/dev/null
install -m 0644 "$KEYDIR/release.pub" /etc/bulkhead/release-key.pub
.venv/bin/python -m bulkhead manifest verify >/dev/null

# Build the demo guest now so `bulkhead demo` starts at once (it is rebuilt only when its sources change).
step "demo guest (gcc, cached)"
.venv/bin/python -m bulkhead.guests.build demo.c >/dev/null

# Shell completion and the man page, generated from the argparse tree (bulkhead/clitree.py): nothing of
# this runs when `bulkhead` starts.
step "shell completion (bash, zsh)"
install -d -m 0755 /usr/share/bash-completion/completions /usr/share/zsh/vendor-completions
.venv/bin/python -m bulkhead.clitree completion bash > /usr/share/bash-completion/completions/bulkhead
.venv/bin/python -m bulkhead.clitree completion zsh > /usr/share/zsh/vendor-completions/_bulkhead
step "man page bulkhead(1)"
install -d -m 0755 /usr/local/share/man/man1
.venv/bin/python -m bulkhead.clitree man -o /usr/local/share/man/man1/bulkhead.1
step "systemd unit /etc/systemd/system/bulkhead.service"
install -m 0644 systemd/bulkhead.service /etc/systemd/system/bulkhead.service
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "install.sh: run \`bulkhead init\` once, then \`systemctl enable --now bulkhead\`"
else
  echo "install.sh: systemd is not running here; the unit is installed for when it is"
fi
echo "install.sh: done. Try: bulkhead demo"
