#!/usr/bin/env bash
# Installs Courier IMAP and Courier POP3 (Debian 12's courier-imap and courier-pop) for
# tests/courier.rs, next to Dovecot, without removing it.
#
# The packages cannot be installed with apt: courier-imap and dovecot-imapd both provide
# imap-server (courier-pop and dovecot-pop3d pop3-server) and conflict, so installing one
# removes the other, although their files do not overlap. So the Courier packages are
# downloaded (`apt-get download`) and unpacked onto / (`dpkg-deb -x`; their paths are
# compiled in: /usr/lib/courier, /etc/courier, /run/courier/authdaemon), without their init
# scripts, systemd units and maintainer scripts; dpkg does not know about them. Their
# runtime libraries do not conflict with anything and are installed with apt.
# tests/support/courier.rs runs authdaemond, couriertcpd, imapd and pop3d by hand.
#
#   tests/install-courier.sh          # installs when missing (idempotent); run as root or a sudoer
#   tests/install-courier.sh --check  # only says whether Courier is installed (exit 1 if not)
#
# Exit status 0: installed (or already there), non-zero: it could not be installed.
set -euo pipefail

# Packages unpacked by hand (no maintainer scripts: they would start services and, for
# courier-imap/courier-pop, need dpkg to remove Dovecot's conflicting packages).
UNPACK=(courier-authlib courier-authdaemon courier-authlib-userdb courier-base courier-imap courier-pop)
# Their runtime libraries (Depends of the above that conflict with nothing).
LIBS=(libcourier-unicode4 libidn12 libgamin0 libltdl7 libgdbm6 libpcre3 libgnutls30 libpam0g libpam-modules
  libpam-runtime libcrypt1)
# What tests/support/courier.rs runs or needs.
FILES=(
  /usr/sbin/couriertcpd
  /usr/lib/courier/courier/imaplogin
  /usr/bin/imapd
  /usr/lib/courier/courier/courierpop3login
  /usr/lib/courier/courier/courierpop3d
  /usr/lib/courier/courier-authlib/authdaemond
  /usr/lib/courier-authlib/libauthpam.so
  /etc/courier/authdaemonrc
  /etc/pam.d/imap
  /etc/pam.d/pop3
)

installed() {
  local f
  for f in "${FILES[@]}"; do
    [ -e "$f" ] || return 1
  done
  for f in /usr/sbin/couriertcpd /usr/lib/courier/courier/imaplogin /usr/bin/imapd \
    /usr/lib/courier/courier/courierpop3login /usr/lib/courier/courier/courierpop3d \
    /usr/lib/courier/courier-authlib/authdaemond /usr/lib/courier-authlib/libauthpam.so; do
    if ldd "$f" 2>/dev/null | grep -q 'not found'; then
      return 1
    fi
  done
  return 0
}

if [ "${1:-}" = "--check" ]; then
  installed
  exit
fi
if installed; then
  exit 0
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "tests/install-courier.sh: installing Courier IMAP/POP3 (unpacked, next to Dovecot)" >&2

# Which Dovecot packages are installed now: they must still be afterwards.
dovecot_before=()
for pkg in dovecot-core dovecot-imapd dovecot-pop3d; do
  if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    dovecot_before+=("$pkg")
  fi
done

$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${LIBS[@]}" >/dev/null

work=$(mktemp -d /tmp/mailgate-courier-install.XXXXXX)
trap '$sudo rm -rf "$work"' EXIT
mkdir "$work/debs" "$work/root"
chmod 755 "$work" "$work/debs"
# apt-get download writes into the current directory, as _apt when it can.
if id _apt >/dev/null 2>&1; then $sudo chown _apt "$work/debs"; fi
(cd "$work/debs" && $sudo apt-get download -q "${UNPACK[@]}" >/dev/null)
for deb in "$work"/debs/*.deb; do
  $sudo dpkg-deb -x "$deb" "$work/root"
done
# Programs and libraries: always (a partial earlier install is repaired). Configuration
# (/etc/courier, /etc/pam.d/imap and pop3): only files not there yet. Not copied: init
# scripts, systemd units, tmpfiles.d, logcheck rules, documentation.
for dir in usr/bin usr/sbin usr/lib/courier usr/lib/courier-authlib; do
  $sudo mkdir -p "/$dir"
  $sudo cp -a "$work/root/$dir/." "/$dir/"
done
for lib in "$work"/root/usr/lib/libcourierauth*; do
  $sudo cp -a "$lib" /usr/lib/
done
$sudo mkdir -p /etc/courier /etc/pam.d
$sudo cp -a -n "$work/root/etc/courier/." /etc/courier/
for f in imap pop3; do
  [ -e "/etc/pam.d/$f" ] || $sudo cp -a "$work/root/etc/pam.d/$f" /etc/pam.d/
done
$sudo mkdir -p /var/lib/courier
$sudo ldconfig

if ! installed; then
  echo "tests/install-courier.sh: Courier is still incomplete after unpacking:" >&2
  for f in "${FILES[@]}"; do
    [ -e "$f" ] || echo "  missing $f" >&2
    ldd "$f" 2>/dev/null | grep 'not found' | sed "s|^|  $f: |" >&2 || true
  done
  exit 1
fi
for pkg in "${dovecot_before[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    echo "tests/install-courier.sh: $pkg is no longer installed" >&2
    exit 1
  fi
done
echo "tests/install-courier.sh: Courier installed" >&2
