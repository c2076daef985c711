#!/usr/bin/env bash
# shellcheck disable=SC2317 # functions run from traps and check() look unreachable
# mailgate quick start: one command from a fresh Debian 12 / Ubuntu machine to a
# running mailgate in front of a throwaway Dovecot, everything on 127.0.0.1.
#
#   deploy/quickstart.sh           set up, then run mailgate in the foreground
#                                  (Ctrl-C stops mailgate *and* the demo Dovecot)
#   deploy/quickstart.sh --check   set up, start mailgate, verify it with curl and
#                                  openssl, stop everything; exit 0 when all passed
#
# What it does:
#   1. installs missing Debian packages (dovecot-imapd, dovecot-pop3d, openssl, curl,
#      ca-certificates, a C linker, libssl-dev and pkg-config for the Rust build: legacy
#      TLS 1.0/1.1 listeners link the system's OpenSSL) with apt-get, through sudo
#      when not root; checks that a recent enough Rust toolchain (cargo) is present;
#   2. builds mailgate: `cargo build --release` in the repository root;
#   3. starts a throwaway Dovecot on loopback with user demo / demo-password and a demo
#      INBOX (plain text, UTF-8 and multipart-with-attachment messages);
#   4. makes a small CA and a certificate for localhost/127.0.0.1 for mailgate, and
#      writes mailgate's configuration;
#   5. prints how to connect (curl, openssl s_client, Thunderbird);
#   6. runs mailgate.
#
# Settings (environment; all optional). These are deliberately not called MAILGATE_*:
# mailgate reads every MAILGATE_* variable as a configuration override.
#   QUICKSTART_DIR                 work dir (default /tmp/mailgate-quickstart;
#                                  MAILGATE_QUICKSTART_DIR is accepted too)
#   QUICKSTART_IMAPS_PORT          mailgate, implicit TLS     (default 1993)
#   QUICKSTART_IMAP_PORT           mailgate, STARTTLS         (default 1143)
#   QUICKSTART_POP3S_PORT          mailgate, POP3 implicit TLS (default 1995)
#   QUICKSTART_POP3_PORT           mailgate, POP3 STLS        (default 1110)
#   QUICKSTART_ADMIN_PORT          mailgate, /metrics etc.    (default 19090)
#   QUICKSTART_DOVECOT_IMAPS_PORT  demo Dovecot, IMAPS        (default 10993)
#   QUICKSTART_DOVECOT_IMAP_PORT   demo Dovecot, IMAP         (default 10143)
#   QUICKSTART_DOVECOT_POP3S_PORT  demo Dovecot, POP3S        (default 10995)
#   QUICKSTART_DOVECOT_POP3_PORT   demo Dovecot, POP3         (default 10110)
#   RUST_LOG                       mailgate's log filter      (default info)
#
# Re-running is safe: a previous quickstart mailgate/Dovecot (pid files in the work dir)
# is stopped first, the demo mailbox is recreated, and the CAs are kept while valid so
# that a CA you imported into a mail client stays trusted.

set -euo pipefail

# ---------------------------------------------------------------------------------------
# Settings

usage() {
	sed -n '/^# mailgate quick start/,/^$/{s/^# \{0,1\}//;p}' "$0"
}

MODE=run
case "${1:-}" in
"") ;;
--check) MODE=check ;;
-h | --help)
	usage
	exit 0
	;;
*)
	echo "quickstart: unknown argument: $1 (try --help)" >&2
	exit 2
	;;
esac
if [[ $# -gt 1 ]]; then
	echo "quickstart: too many arguments (try --help)" >&2
	exit 2
fi

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd -- "$SCRIPT_DIR/.." && pwd -P)

WORK=${QUICKSTART_DIR:-${MAILGATE_QUICKSTART_DIR:-/tmp/mailgate-quickstart}}
# The names from older notes (MAILGATE_IMAPS_PORT, MAILGATE_IMAP_PORT) still work here,
# but are never passed on to mailgate (see sanitize_mailgate_env).
MG_IMAPS_PORT=${QUICKSTART_IMAPS_PORT:-${MAILGATE_IMAPS_PORT:-1993}}
MG_IMAP_PORT=${QUICKSTART_IMAP_PORT:-${MAILGATE_IMAP_PORT:-1143}}
MG_POP3S_PORT=${QUICKSTART_POP3S_PORT:-1995}
MG_POP3_PORT=${QUICKSTART_POP3_PORT:-1110}
MG_ADMIN_PORT=${QUICKSTART_ADMIN_PORT:-19090}
DC_IMAPS_PORT=${QUICKSTART_DOVECOT_IMAPS_PORT:-10993}
DC_IMAP_PORT=${QUICKSTART_DOVECOT_IMAP_PORT:-10143}
DC_POP3S_PORT=${QUICKSTART_DOVECOT_POP3S_PORT:-10995}
DC_POP3_PORT=${QUICKSTART_DOVECOT_POP3_PORT:-10110}

DEMO_USER=demo
DEMO_PASS=demo-password
# The mail owner when running as root: Dovecot refuses to access mail as uid 0.
MAIL_USER=mailgate-test
# Appears in the demo Dovecot's greeting, so we know we reached *our* Dovecot.
DC_GREETING="Dovecot (mailgate quickstart) ready."

export RUST_LOG="${RUST_LOG:-info}"

# ---------------------------------------------------------------------------------------
# Helpers

if [[ -t 1 ]]; then
	BOLD=$'\e[1m' RED=$'\e[31m' GREEN=$'\e[32m' RESET=$'\e[0m'
else
	BOLD='' RED='' GREEN='' RESET=''
fi
step() { printf '%s==> %s%s\n' "$BOLD" "$*" "$RESET"; }
note() { printf '    %s\n' "$*"; }
warn() { printf '%squickstart: warning:%s %s\n' "$RED" "$RESET" "$*" >&2; }
die() {
	printf '%squickstart: error:%s %s\n' "$RED" "$RESET" "$*" >&2
	exit 1
}

IS_ROOT=0
[[ $(id -u) == 0 ]] && IS_ROOT=1

as_root() {
	if ((IS_ROOT)); then
		"$@"
	elif command -v sudo >/dev/null 2>&1; then
		sudo "$@"
	else
		die "need root for: $* (install sudo, or run this script as root)"
	fi
}

check_port() { # name value
	local name=$1 value=$2
	if ! [[ $value =~ ^[0-9]+$ ]] || ((value < 1 || value > 65535)); then
		die "$name must be a port number (1-65535), got '$value'"
	fi
	if ((value < 1024 && !IS_ROOT)); then
		die "$name=$value is a privileged port; pick one >= 1024"
	fi
}

# True if something accepts TCP connections on 127.0.0.1:PORT.
port_busy() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# True if a socket is in LISTEN state on 127.0.0.1:PORT (silent: no connection made).
port_listening() {
	local hex
	hex=$(printf '0100007F:%04X' "$1")
	awk -v a="$hex" '$2 == a && $4 == "0A" { found = 1 } END { exit !found }' /proc/net/tcp
}

# First line the server on 127.0.0.1:PORT sends, without its CR; fails if none.
greeting() {
	(
		exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
		IFS= read -r -t 3 line <&3 || exit 1
		printf '%s\n' "${line%$'\r'}"
	) 2>/dev/null
}

# True if PID is alive and its command line mentions NEEDLE (guards against pid reuse).
pid_matches() { # pid needle
	local pid=$1 needle=$2 cmdline
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	kill -0 "$pid" 2>/dev/null || return 1
	cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
	[[ $cmdline == *"$needle"* ]]
}

# Sends SIGTERM, waits up to SECONDS for the process to go away, then SIGKILL.
terminate() { # pid seconds what
	local pid=$1 seconds=$2 what=$3 i
	kill -TERM "$pid" 2>/dev/null || return 0
	for ((i = 0; i < seconds * 10; i++)); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
	warn "$what (pid $pid) ignored SIGTERM for ${seconds}s; killing it"
	kill -KILL "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------
# Validate settings before touching anything

check_port QUICKSTART_IMAPS_PORT "$MG_IMAPS_PORT"
check_port QUICKSTART_IMAP_PORT "$MG_IMAP_PORT"
check_port QUICKSTART_POP3S_PORT "$MG_POP3S_PORT"
check_port QUICKSTART_POP3_PORT "$MG_POP3_PORT"
check_port QUICKSTART_ADMIN_PORT "$MG_ADMIN_PORT"
check_port QUICKSTART_DOVECOT_IMAPS_PORT "$DC_IMAPS_PORT"
check_port QUICKSTART_DOVECOT_IMAP_PORT "$DC_IMAP_PORT"
check_port QUICKSTART_DOVECOT_POP3S_PORT "$DC_POP3S_PORT"
check_port QUICKSTART_DOVECOT_POP3_PORT "$DC_POP3_PORT"
ALL_PORTS=("$MG_IMAPS_PORT" "$MG_IMAP_PORT" "$MG_POP3S_PORT" "$MG_POP3_PORT" "$MG_ADMIN_PORT" "$DC_IMAPS_PORT" "$DC_IMAP_PORT" "$DC_POP3S_PORT" "$DC_POP3_PORT")
if [[ $(printf '%s\n' "${ALL_PORTS[@]}" | sort -u | wc -l) -ne ${#ALL_PORTS[@]} ]]; then
	die "the nine ports must differ: ${ALL_PORTS[*]}"
fi

[[ $WORK == /* ]] || WORK="$PWD/$WORK"
WORK=${WORK%/}
# The path goes verbatim into Dovecot's and mailgate's configuration files.
[[ $WORK =~ ^/[A-Za-z0-9._/+-]+$ ]] ||
	die "work dir '$WORK' may only contain letters, digits and . _ / + -"

MG_CONF="$WORK/mailgate/mailgate.toml"
MG_PIDFILE="$WORK/mailgate.pid"
MG_LOG="$WORK/mailgate.log"
DC="$WORK/dovecot"
DC_CONF="$DC/dovecot.conf"
DC_PIDFILE="$DC/run/master.pid"
CA_PEM="$WORK/ca.pem"

# mailgate layers MAILGATE_* variables over its config file (MAILGATE_SECTION__KEY), and
# rejects names that are not a known section. Variables meant for this script (or set by
# mistake) would make it refuse to start: remove every MAILGATE_* without "__" from the
# environment it inherits; keep, but point out, genuine overrides.
sanitize_mailgate_env() {
	local name
	for name in $(compgen -e); do
		case $name in
		MAILGATE_*__*) warn "passing $name to mailgate: it overrides the generated configuration" ;;
		MAILGATE_*) unset "$name" ;;
		esac
	done
}
sanitize_mailgate_env

# ---------------------------------------------------------------------------------------
# Cleanup: whatever happens, do not leave our processes behind

MG_PID=""
DC_STARTED=0
DC_PID=""

stop_mailgate() {
	if [[ -n $MG_PID ]] && kill -0 "$MG_PID" 2>/dev/null; then
		step "Stopping mailgate (pid $MG_PID)"
		# shutdown.grace is 5s in the generated config.
		terminate "$MG_PID" 15 mailgate
		wait "$MG_PID" 2>/dev/null || true
	fi
	MG_PID=""
	rm -f "$MG_PIDFILE"
}

stop_dovecot() { # pid [what]
	local pid=$1
	if pid_matches "$pid" "$DC_CONF"; then
		step "Stopping ${2:-the demo Dovecot} (pid $pid)"
		terminate "$pid" 10 dovecot
	fi
}

cleanup() {
	local rc=$?
	trap - EXIT INT TERM HUP
	stop_mailgate
	if ((DC_STARTED)); then
		# Ours only: if a newer quickstart run took over the work dir (and stopped our
		# mailgate, which is why we are here), the pid file names its Dovecot.
		stop_dovecot "${DC_PID:-$(cat "$DC_PIDFILE" 2>/dev/null || true)}"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ---------------------------------------------------------------------------------------
# 1. Packages and toolchain

install_packages() {
	# libssl-dev and pkg-config: mailgate links the system's OpenSSL (TLS 1.0/1.1 for the
	# listeners and upstreams that opt in; rustls serves everything else).
	local wanted=(dovecot-imapd dovecot-pop3d openssl curl ca-certificates libssl-dev pkg-config) missing=() pkg
	# The Rust build links with the system C toolchain (and ring compiles some C).
	command -v cc >/dev/null 2>&1 || wanted+=(gcc libc6-dev)

	step "Checking packages: ${wanted[*]}"
	if ! command -v dpkg-query >/dev/null 2>&1; then
		local bin
		for bin in /usr/sbin/dovecot openssl curl; do
			command -v "$bin" >/dev/null 2>&1 ||
				die "no dpkg here and $bin is missing: install Dovecot (imap + pop3), openssl and curl"
		done
		note "not a Debian system: assuming the tools found are good enough"
		return
	fi
	for pkg in "${wanted[@]}"; do
		if [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) != "install ok installed" ]]; then
			missing+=("$pkg")
		fi
	done
	if ((${#missing[@]} == 0)); then
		note "all installed"
		return
	fi
	step "Installing: ${missing[*]}"
	as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
	if [[ " ${missing[*]} " == *" dovecot-"* ]]; then
		note "Note: the Debian package also enabled the system-wide Dovecot service (ports 143, 993,"
		note "110, 995). This quick start does not use it; to turn it off:"
		note "    sudo systemctl disable --now dovecot"
	fi
}

check_rust() {
	step "Checking the Rust toolchain"
	if ! command -v cargo >/dev/null 2>&1 && [[ -x "${HOME:-/nonexistent}/.cargo/bin/cargo" ]]; then
		PATH="$HOME/.cargo/bin:$PATH"
	fi
	local need have
	need=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$REPO/Cargo.toml" | head -n1)
	if ! command -v cargo >/dev/null 2>&1; then
		{
			echo
			echo "cargo (the Rust toolchain) is not installed. mailgate needs Rust ${need:-stable}; Debian's"
			echo "packaged Rust is too old, so install it with rustup (https://rustup.rs):"
			echo
			echo "    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y"
			echo "    . \"\$HOME/.cargo/env\""
			echo
			echo "then run $0 again."
			if ((IS_ROOT)) && [[ -n ${SUDO_USER:-} ]]; then
				echo
				echo "You ran this script with sudo. If $SUDO_USER already has rustup, run it as"
				echo "$SUDO_USER instead: it calls sudo itself for apt-get."
			fi
		} >&2
		exit 1
	fi
	have=$(rustc --version 2>/dev/null | awk '{print $2}' || true)
	if [[ -n $need && -n $have ]] &&
		[[ $(printf '%s\n%s\n' "$need" "${have%%-*}" | sort -V | head -n1) != "$need" ]]; then
		{
			echo
			echo "Rust $have is too old: mailgate needs $need or newer."
			echo "With rustup:   rustup update stable"
			echo "Without it, remove the distribution's rustc/cargo and install rustup (https://rustup.rs)."
		} >&2
		exit 1
	fi
	note "$(cargo --version)"
}

# ---------------------------------------------------------------------------------------
# 2. Build

build() {
	step "Building mailgate (cargo build --release in $REPO; the first build takes a few minutes)"
	(cd "$REPO" && cargo build --release)
	local target
	# Honours CARGO_TARGET_DIR and build.target-dir.
	target=$(cd "$REPO" && { cargo metadata --format-version 1 --no-deps 2>/dev/null || true; } |
		sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
	MAILGATE_BIN="${target:-$REPO/target}/release/mailgate"
	[[ -x $MAILGATE_BIN ]] || die "build finished but $MAILGATE_BIN is missing"
	note "$MAILGATE_BIN"
}

# ---------------------------------------------------------------------------------------
# Work dir, previous runs

prepare_workdir() {
	step "Work dir: $WORK"
	if [[ -L $WORK ]]; then
		die "$WORK is a symbolic link; refusing to use it (set QUICKSTART_DIR)"
	fi
	if [[ -e $WORK ]]; then
		[[ -d $WORK ]] || die "$WORK exists and is not a directory"
		[[ -O $WORK ]] || die "$WORK belongs to another user; remove it or set QUICKSTART_DIR"
	fi
	(umask 022 && mkdir -p "$WORK/mailgate" "$DC")
	# Dovecot's auth process (user dovecot) and the mail user must reach their files.
	chmod 755 "$WORK" "$DC"
	chmod 700 "$WORK/mailgate"

	# A quickstart mailgate or Dovecot from an earlier run that did not end cleanly.
	local pid
	pid=$(cat "$MG_PIDFILE" 2>/dev/null || true)
	if pid_matches "$pid" "$MG_CONF"; then
		step "Stopping the mailgate of a previous run (pid $pid)"
		terminate "$pid" 15 mailgate
	fi
	rm -f "$MG_PIDFILE"
	stop_dovecot "$(cat "$DC_PIDFILE" 2>/dev/null || true)" "the Dovecot of a previous run"

	local port
	for port in "${ALL_PORTS[@]}"; do
		if port_busy "$port"; then
			die "127.0.0.1:$port is already in use by another program; pick other ports with the QUICKSTART_*_PORT variables (see --help)"
		fi
	done
}

# ---------------------------------------------------------------------------------------
# Certificates: a CA (name-constrained to localhost and 127.0.0.0/8, so trusting it in a
# mail client cannot expose anything else) and a leaf it signed. Not one self-signed
# certificate: rustls (webpki) rejects a CA certificate used as a server certificate, and
# `openssl req -x509` makes CA certificates.

pki_valid() { # ca_pem ca_key leaf_pem leaf_key
	local f
	for f in "$@"; do [[ -s $f ]] || return 1; done
	openssl verify -CAfile "$1" "$3" >/dev/null 2>&1 || return 1
	openssl x509 -in "$1" -noout -checkend 86400 >/dev/null 2>&1 || return 1
	openssl x509 -in "$3" -noout -checkend 86400 >/dev/null 2>&1 || return 1
	[[ $(openssl x509 -in "$1" -noout -pubkey 2>/dev/null) == "$(openssl pkey -in "$2" -pubout 2>/dev/null)" ]] || return 1
	[[ $(openssl x509 -in "$3" -noout -pubkey 2>/dev/null) == "$(openssl pkey -in "$4" -pubout 2>/dev/null)" ]] || return 1
}

make_pki() { # ca_pem ca_key leaf_pem leaf_key ca_name
	local ca_pem=$1 ca_key=$2 leaf_pem=$3 leaf_key=$4 ca_name=$5
	if pki_valid "$ca_pem" "$ca_key" "$leaf_pem" "$leaf_key"; then
		note "reusing $ca_pem and its certificate $leaf_pem (delete them for new ones)"
		return
	fi
	local tmp
	tmp=$(mktemp -d "$WORK/.pki.XXXXXX")
	local newkey=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
	(
		umask 077
		openssl req -x509 -days 365 -subj "/O=mailgate quickstart/CN=$ca_name" "${newkey[@]}" \
			-addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
			-addext "keyUsage=critical,keyCertSign,cRLSign" \
			-addext "nameConstraints=critical,permitted;DNS:localhost,permitted;IP:127.0.0.0/255.0.0.0" \
			-keyout "$tmp/ca.key" -out "$tmp/ca.pem"
		openssl req -new -subj "/O=mailgate quickstart/CN=localhost" "${newkey[@]}" \
			-keyout "$tmp/leaf.key" -out "$tmp/leaf.csr"
		cat >"$tmp/leaf.ext" <<-'EOF'
			basicConstraints=critical,CA:FALSE
			keyUsage=critical,digitalSignature
			extendedKeyUsage=serverAuth
			subjectAltName=DNS:localhost,IP:127.0.0.1
		EOF
		# Distinct serials: clients that index certificates by issuer and serial (NSS,
		# i.e. Thunderbird) would otherwise see clashes between runs.
		openssl x509 -req -days 365 -set_serial "$(date +%s%N)" -in "$tmp/leaf.csr" \
			-CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -extfile "$tmp/leaf.ext" -out "$tmp/leaf.pem"
	) 2>"$tmp/openssl.log" || {
		cat "$tmp/openssl.log" >&2
		rm -rf "$tmp"
		die "openssl failed to make certificates"
	}
	chmod 644 "$tmp/ca.pem" "$tmp/leaf.pem"
	mv -f "$tmp/ca.key" "$ca_key"
	mv -f "$tmp/ca.pem" "$ca_pem"
	mv -f "$tmp/leaf.key" "$leaf_key"
	mv -f "$tmp/leaf.pem" "$leaf_pem"
	rm -rf "$tmp"
	note "new CA $ca_pem, certificate $leaf_pem (localhost, 127.0.0.1)"
}

# ---------------------------------------------------------------------------------------
# 3. The demo Dovecot

getent_field() { # database key field
	getent "$1" "$2" 2>/dev/null | cut -d: -f"$3"
}

dovecot_identity() {
	if ((IS_ROOT)); then
		if ! getent passwd "$MAIL_USER" >/dev/null; then
			note "creating the unprivileged system user $MAIL_USER to own the demo mail"
			useradd --system --no-create-home --user-group --home-dir /nonexistent \
				--shell /usr/sbin/nologin "$MAIL_USER"
		fi
		MAIL_UID=$(getent_field passwd "$MAIL_USER" 3)
		MAIL_GID=$(getent_field passwd "$MAIL_USER" 4)
		# Debian's dovecot-core creates dovecot and dovenull.
		if getent passwd dovecot >/dev/null; then
			INTERNAL_USER=dovecot
			INTERNAL_GROUP=$(getent_field group "$(getent_field passwd dovecot 4)" 1)
		else
			INTERNAL_USER=$MAIL_USER
			INTERNAL_GROUP=$(getent_field group "$MAIL_GID" 1)
		fi
		if getent passwd dovenull >/dev/null; then
			LOGIN_USER=dovenull
		else
			LOGIN_USER=$INTERNAL_USER
		fi
		ROOTLESS=0
	else
		# Rootless: everything runs as us, which needs no chroot and ourselves as the
		# internal user.
		MAIL_UID=$(id -u)
		MAIL_GID=$(id -g)
		INTERNAL_USER=$(id -un)
		INTERNAL_GROUP=$(id -gn)
		LOGIN_USER=$INTERNAL_USER
		ROOTLESS=1
	fi
}

write_demo_mail() { # maildir
	local maildir=$1 now ts i=0 file
	now=$(date +%s)
	mkdir -p "$maildir/cur" "$maildir/new" "$maildir/tmp"

	b64word() { printf '=?UTF-8?B?%s?=' "$(printf '%s' "$1" | base64 -w0)"; }

	# Maildir file names start with the delivery time; Dovecot numbers new messages in
	# that order, so these become UIDs 1, 2, 3.
	next_file() {
		i=$((i + 1))
		ts=$((now - (4 - i) * 3600))
		file="$maildir/cur/$ts.M${i}P$$.quickstart:2,"
		DATE=$(LC_ALL=C date -R -d "@$ts")
		MSGID="<quickstart-$i.$ts@mailgate.example>"
	}

	next_file
	cat >"$file" <<-EOF
		Return-Path: <quickstart@mailgate.example>
		Date: $DATE
		From: mailgate quickstart <quickstart@mailgate.example>
		To: Demo User <demo@mailgate.example>
		Subject: Welcome to mailgate
		Message-ID: $MSGID
		MIME-Version: 1.0
		Content-Type: text/plain; charset=us-ascii
		Content-Transfer-Encoding: 7bit

		Hello demo,

		if you can read this, your IMAP client reached the demo Dovecot through
		mailgate:

		  you --TLS--> mailgate 127.0.0.1:$MG_IMAPS_PORT (or :$MG_IMAP_PORT with STARTTLS)
		      --TLS--> Dovecot  127.0.0.1:$DC_IMAPS_PORT

		mailgate terminated your TLS connection, made sure your password travelled
		encrypted, logged in to Dovecot on your behalf, and now relays this session.

		Message 2 is UTF-8 text, message 3 has a small attachment.

		-- 
		deploy/quickstart.sh
	EOF

	next_file
	cat >"$file" <<-EOF
		Return-Path: <zoe@example.org>
		Date: $DATE
		From: $(b64word 'Zoë Ångström') <zoe@example.org>
		To: Demo User <demo@mailgate.example>
		Subject: $(b64word 'Grüße aus Köln – Καλημέρα – こんにちは ✓')
		Message-ID: $MSGID
		MIME-Version: 1.0
		Content-Type: text/plain; charset=utf-8
		Content-Transfer-Encoding: 8bit

		Hallo demo,

		schöne Grüße aus Köln! Die Straße vor dem Büro ist heute ganz ruhig.
		Καλημέρα κόσμε. Привет, мир! こんにちは、世界。 مرحبا بالعالم
		Prices: 12,50 € · £9.99 · ¥1200 · ½ off

		Every byte of this message is UTF-8 and went through mailgate untouched ✉ 🔒

		Zoë
	EOF

	next_file
	local boundary="=_mailgate_quickstart_$now"
	local csv
	csv=$(
		cat <<-EOF
			service,address,tls
			mailgate imaps,127.0.0.1:$MG_IMAPS_PORT,implicit
			mailgate imap,127.0.0.1:$MG_IMAP_PORT,starttls
			dovecot imaps,127.0.0.1:$DC_IMAPS_PORT,implicit
			dovecot imap,127.0.0.1:$DC_IMAP_PORT,starttls
		EOF
	)
	cat >"$file" <<-EOF
		Return-Path: <reports@example.net>
		Date: $DATE
		From: Weekly Reports <reports@example.net>
		To: Demo User <demo@mailgate.example>
		Subject: Port overview (CSV attached)
		Message-ID: $MSGID
		MIME-Version: 1.0
		Content-Type: multipart/mixed; boundary="$boundary"

		This is a multi-part message in MIME format.

		--$boundary
		Content-Type: text/plain; charset=us-ascii
		Content-Transfer-Encoding: 7bit

		Hi demo,

		the overview of this quick start's ports is attached as ports.csv.

		Regards,
		the report robot

		--$boundary
		Content-Type: text/csv; charset=us-ascii; name="ports.csv"
		Content-Disposition: attachment; filename="ports.csv"
		Content-Transfer-Encoding: base64

		$(printf '%s\n' "$csv" | base64 -w76)

		--$boundary--
	EOF
	unset -f next_file b64word
}

start_dovecot() {
	step "Starting the demo Dovecot on 127.0.0.1 (imap $DC_IMAP_PORT, imaps $DC_IMAPS_PORT, pop3 $DC_POP3_PORT, pop3s $DC_POP3S_PORT)"
	local dovecot=/usr/sbin/dovecot
	[[ -x $dovecot ]] || dovecot=$(command -v dovecot) || die "dovecot is not installed"
	dovecot_identity

	# Fresh state every run; the TLS material is kept (see make_pki).
	rm -rf "$DC/run" "$DC/state" "$DC/mail" "$DC/passwd" "$DC_CONF" "$DC/dovecot.log" "$DC/stdio.log"
	mkdir -p "$DC/tls"
	chmod 755 "$DC/tls"
	make_pki "$DC/tls/ca.pem" "$DC/tls/ca.key" "$DC/tls/server.pem" "$DC/tls/server.key" \
		"mailgate quickstart Dovecot CA"

	local home="$DC/mail/$DEMO_USER"
	(umask 077 && mkdir -p "$home") && chmod 755 "$DC/mail"
	write_demo_mail "$home/Maildir"
	chmod -R go-rwx "$home"
	if ((IS_ROOT)); then
		chown -R "$MAIL_UID:$MAIL_GID" "$home"
	fi
	(umask 022 && printf '%s:{PLAIN}%s:%s:%s::%s::\n' \
		"$DEMO_USER" "$DEMO_PASS" "$MAIL_UID" "$MAIL_GID" "$home" >"$DC/passwd")

	if ((IS_ROOT)) && command -v runuser >/dev/null 2>&1; then
		runuser -u "$INTERNAL_USER" -- test -r "$DC/passwd" ||
			die "user $INTERNAL_USER cannot read $DC/passwd: put the work dir somewhere world-searchable (QUICKSTART_DIR)"
		runuser -u "$MAIL_USER" -- test -x "$home" ||
			die "user $MAIL_USER cannot reach $home: put the work dir somewhere world-searchable (QUICKSTART_DIR)"
	fi

	local chroots=""
	if ((ROOTLESS)); then
		chroots=$'\n# Unprivileged: chroot(2) needs root.\n'
		local service
		for service in anvil imap-login pop3-login ipc old-stats imap-urlauth-login; do
			chroots+="service $service {"$'\n'"  chroot ="$'\n'"}"$'\n'
		done
	fi

	(umask 022 && cat >"$DC_CONF") <<-EOF
		# Generated by deploy/quickstart.sh: a throwaway Dovecot for the mailgate quick start.
		# Loopback only; user $DEMO_USER / $DEMO_PASS.
		instance_name = mailgate-quickstart
		base_dir = $DC/run
		state_dir = $DC/state
		log_path = $DC/dovecot.log
		auth_verbose = yes
		login_greeting = $DC_GREETING

		protocols = imap pop3
		listen = 127.0.0.1
		ssl = yes
		ssl_cert = <$DC/tls/server.pem
		ssl_key = <$DC/tls/server.key
		disable_plaintext_auth = no
		auth_mechanisms = plain login
		# mailgate (on 127.0.0.1) forwards each client's address (forward_client =
		# "commands", its default); trusting it makes Dovecot's logs and per-address rules
		# see the client, not mailgate.
		login_trusted_networks = 127.0.0.1/32

		# No 2 s delay (and growing penalty) after a wrong password: it is a demo.
		auth_failure_delay = 0
		service anvil {
		  unix_listener anvil-auth-penalty {
		    mode = 0
		  }
		}

		default_internal_user = $INTERNAL_USER
		default_internal_group = $INTERNAL_GROUP
		default_login_user = $LOGIN_USER
		first_valid_uid = $MAIL_UID
		first_valid_gid = 1
		mail_location = maildir:~/Maildir
		mail_fsync = never

		passdb {
		  driver = passwd-file
		  args = scheme=PLAIN username_format=%u $DC/passwd
		}
		userdb {
		  driver = passwd-file
		  args = username_format=%u $DC/passwd
		}

		service imap-login {
		  inet_listener imap {
		    port = $DC_IMAP_PORT
		  }
		  inet_listener imaps {
		    port = $DC_IMAPS_PORT
		    ssl = yes
		  }
		}
		service pop3-login {
		  inet_listener pop3 {
		    port = $DC_POP3_PORT
		  }
		  inet_listener pop3s {
		    port = $DC_POP3S_PORT
		    ssl = yes
		  }
		}
		protocol imap {
		  mail_max_userip_connections = 50
		}
		protocol pop3 {
		  mail_max_userip_connections = 50
		}
		$chroots
	EOF

	# Without -F, dovecot reports configuration and bind errors, then daemonizes and
	# writes $DC_PIDFILE; cleanup() stops it by that pid.
	DC_STARTED=1
	if ! "$dovecot" -c "$DC_CONF" >"$DC/stdio.log" 2>&1; then
		cat "$DC/stdio.log" >&2
		tail -n 20 "$DC/dovecot.log" >&2 2>/dev/null || true
		die "dovecot failed to start (config: $DC_CONF)"
	fi
	local i line=""
	for ((i = 0; i < 150; i++)); do
		line=$(greeting "$DC_IMAP_PORT" || true)
		[[ $line == "* OK"*"$DC_GREETING"* ]] && break
		sleep 0.1
	done
	if [[ $line != "* OK"*"$DC_GREETING"* ]]; then
		cat "$DC/stdio.log" >&2
		tail -n 30 "$DC/dovecot.log" >&2 2>/dev/null || true
		die "the demo Dovecot did not greet on 127.0.0.1:$DC_IMAP_PORT within 15s"
	fi
	DC_PID=$(cat "$DC_PIDFILE" 2>/dev/null || true)
	note "pid $DC_PID, log $DC/dovecot.log, mail $home/Maildir"
}

# ---------------------------------------------------------------------------------------
# 4. mailgate's certificate and configuration

configure_mailgate() {
	step "Certificate and configuration for mailgate"
	make_pki "$CA_PEM" "$WORK/ca.key" "$WORK/mailgate/cert.pem" "$WORK/mailgate/key.pem" \
		"mailgate quickstart CA"
	# The admin token: /debug/* (the support view of an account names users) needs it.
	(umask 077 && openssl rand -hex 16 >"$WORK/mailgate/admin-token")
	(umask 077 && cat >"$MG_CONF") <<-EOF
		# Generated by deploy/quickstart.sh; see mailgate.example.toml for every key.
		# Clients trust $CA_PEM; mailgate trusts the demo Dovecot's own CA.

		# Implicit TLS (RFC 8314): TLS from the first byte.
		[[listener]]
		name = "imaps"
		protocol = "imap"
		address = "127.0.0.1:$MG_IMAPS_PORT"
		tls = "implicit"
		upstream = "default"

		# STARTTLS: LOGIN/AUTHENTICATE are refused until the client upgrades.
		[[listener]]
		name = "imap"
		protocol = "imap"
		address = "127.0.0.1:$MG_IMAP_PORT"
		tls = "starttls"
		upstream = "default"

		# POP3 the same way: implicit TLS (995-style) and STLS (110-style).
		[[listener]]
		name = "pop3s"
		protocol = "pop3"
		address = "127.0.0.1:$MG_POP3S_PORT"
		tls = "implicit"

		[[listener]]
		name = "pop3"
		protocol = "pop3"
		address = "127.0.0.1:$MG_POP3_PORT"
		tls = "starttls"

		[tls]
		certificates = [{ cert = "$WORK/mailgate/cert.pem", key = "$WORK/mailgate/key.pem" }]

		# The demo Dovecot, over implicit TLS, verified against its CA.
		[upstream.default]
		imap = "127.0.0.1:$DC_IMAPS_PORT"
		pop3 = "127.0.0.1:$DC_POP3S_PORT"
		tls = "implicit"
		ca_file = "$DC/tls/ca.pem"

		# Prometheus metrics, /healthz, /readyz; with the token /debug/top-accounts and the
		# support view of an account, /debug/accounts/<user>.
		[admin]
		address = "127.0.0.1:$MG_ADMIN_PORT"
		token_file = "$WORK/mailgate/admin-token"

		[shutdown]
		# Ctrl-C should not keep you waiting: open sessions get 5s to finish.
		grace = "5s"
	EOF
	local out
	if ! out=$("$MAILGATE_BIN" check-config --config "$MG_CONF" 2>&1); then
		printf '%s\n' "$out" >&2
		die "mailgate rejected the generated configuration $MG_CONF"
	fi
	note "$MG_CONF"
}

start_mailgate() { # log file, or "" for the terminal
	local log=$1
	step "Starting mailgate (RUST_LOG=$RUST_LOG)"
	if [[ -n $log ]]; then
		"$MAILGATE_BIN" run --config "$MG_CONF" </dev/null >"$log" 2>&1 &
	else
		"$MAILGATE_BIN" run --config "$MG_CONF" </dev/null &
	fi
	MG_PID=$!
	echo "$MG_PID" >"$MG_PIDFILE"
	local i
	for ((i = 0; i < 150; i++)); do
		if ! kill -0 "$MG_PID" 2>/dev/null; then
			local rc=0
			wait "$MG_PID" || rc=$?
			MG_PID=""
			[[ -n $log ]] && cat "$log" >&2
			die "mailgate exited during startup (status $rc)"
		fi
		if port_listening "$MG_IMAPS_PORT" && port_listening "$MG_IMAP_PORT" &&
			port_listening "$MG_POP3S_PORT" && port_listening "$MG_POP3_PORT"; then
			return 0
		fi
		sleep 0.1
	done
	[[ -n $log ]] && cat "$log" >&2
	die "mailgate did not listen on 127.0.0.1:$MG_IMAPS_PORT, :$MG_IMAP_PORT, :$MG_POP3S_PORT and :$MG_POP3_PORT within 15s"
}

# ---------------------------------------------------------------------------------------
# 5. How to connect

print_instructions() {
	local w=$WORK
	cat <<-EOF

		${BOLD}mailgate is running${RESET}: IMAP 127.0.0.1:$MG_IMAPS_PORT (implicit TLS) and 127.0.0.1:$MG_IMAP_PORT (STARTTLS),
		POP3 127.0.0.1:$MG_POP3S_PORT (implicit TLS) and 127.0.0.1:$MG_POP3_PORT (STLS),
		in front of the demo Dovecot on 127.0.0.1:$DC_IMAPS_PORT. User ${BOLD}$DEMO_USER${RESET}, password ${BOLD}$DEMO_PASS${RESET}.
		Clients must trust the quick start CA: $w/ca.pem

		Fetch the first message (from another terminal):

		  curl --cacert $w/ca.pem 'imaps://127.0.0.1:$MG_IMAPS_PORT/INBOX;UID=1' -u $DEMO_USER:$DEMO_PASS

		The same over STARTTLS (--ssl-reqd: fail rather than log in unencrypted):

		  curl --ssl-reqd --cacert $w/ca.pem 'imap://127.0.0.1:$MG_IMAP_PORT/INBOX;UID=1' -u $DEMO_USER:$DEMO_PASS

		UID=2 is a UTF-8 message, UID=3 has an attachment.

		POP3, over implicit TLS and over STLS (list, then retrieve message 1):

		  curl --cacert $w/ca.pem 'pop3s://127.0.0.1:$MG_POP3S_PORT/' -u $DEMO_USER:$DEMO_PASS
		  curl --cacert $w/ca.pem 'pop3s://127.0.0.1:$MG_POP3S_PORT/1' -u $DEMO_USER:$DEMO_PASS
		  curl --ssl-reqd --cacert $w/ca.pem 'pop3://127.0.0.1:$MG_POP3_PORT/1' -u $DEMO_USER:$DEMO_PASS

		Speak IMAP yourself (check for "Verify return code: 0 (ok)"):

		  openssl s_client -connect 127.0.0.1:$MG_IMAPS_PORT -CAfile $w/ca.pem -crlf
		  openssl s_client -connect 127.0.0.1:$MG_IMAP_PORT -starttls imap -CAfile $w/ca.pem -crlf

		then type:
		  a LOGIN $DEMO_USER $DEMO_PASS
		  b SELECT INBOX
		  c FETCH 1:* (FLAGS ENVELOPE)
		  d LOGOUT

		Mail client (Thunderbird: Account Settings > Account Actions > Add Mail Account,
		then "Configure manually"):
		  Incoming: IMAP, server 127.0.0.1, port $MG_IMAPS_PORT, Connection security SSL/TLS,
		            Authentication method "Normal password", username $DEMO_USER
		            (or port $MG_IMAP_PORT with STARTTLS; POP3: port $MG_POP3S_PORT, SSL/TLS)
		  Outgoing: mailgate does not relay SMTP; any server will do for reading.
		  Trust the CA first: Settings > Privacy & Security > Certificates > Manage Certificates
		  > Authorities > Import $w/ca.pem, tick "Trust this CA to identify websites".
		  The CA can only vouch for localhost and 127.0.0.0/8 (X.509 name constraints).

		Metrics (Prometheus text format), the heaviest accounts, and the support view of the
		demo account (which devices used it, deletions, detected mistakes):

		  curl -s http://127.0.0.1:$MG_ADMIN_PORT/metrics | grep mailgate_logins_total
		  curl -s -H "Authorization: Bearer \$(cat $WORK/mailgate/admin-token)" http://127.0.0.1:$MG_ADMIN_PORT/debug/top-accounts
		  curl -s -H "Authorization: Bearer \$(cat $WORK/mailgate/admin-token)" http://127.0.0.1:$MG_ADMIN_PORT/debug/accounts/$DEMO_USER
		  In a browser: http://127.0.0.1:$MG_ADMIN_PORT/debug/accounts/$DEMO_USER?format=html
		  (any user name, the token as the password)

		Files: $MG_CONF (mailgate), $DC/dovecot.log (Dovecot)
	EOF
}

# ---------------------------------------------------------------------------------------
# --check: what the README's quick start promises, verified

CHECK_FAILED=0
CHECK_DIR=""

check() { # description expected-substring command...
	local what=$1 expect=$2 out rc=0
	shift 2
	CHECK_COUNT=$((CHECK_COUNT + 1))
	out="$CHECK_DIR/$(printf '%02d' "$CHECK_COUNT").out"
	"$@" >"$out" 2>&1 || rc=$?
	if ((rc == 0)) && grep -qF -- "$expect" "$out"; then
		printf '    %sPASS%s %s\n' "$GREEN" "$RESET" "$what"
	else
		printf '    %sFAIL%s %s (exit %s; expected "%s")\n' "$RED" "$RESET" "$what" "$rc" "$expect"
		printf '         $ %s\n' "$*"
		sed 's/^/         | /' "$out" | tail -n 15
		CHECK_FAILED=1
	fi
}

check_fails() { # description command...   (must exit non-zero)
	local what=$1 out rc=0
	shift
	CHECK_COUNT=$((CHECK_COUNT + 1))
	out="$CHECK_DIR/$(printf '%02d' "$CHECK_COUNT").out"
	"$@" >"$out" 2>&1 || rc=$?
	if ((rc != 0)); then
		printf '    %sPASS%s %s (refused, exit %s)\n' "$GREEN" "$RESET" "$what" "$rc"
	else
		printf '    %sFAIL%s %s: succeeded but should not have\n' "$RED" "$RESET" "$what"
		printf '         $ %s\n' "$*"
		CHECK_FAILED=1
	fi
}

# LOGIN in the clear on the STARTTLS port: mailgate must refuse it.
plaintext_login() {
	(
		exec 3<>"/dev/tcp/127.0.0.1/$MG_IMAP_PORT" || exit 1
		IFS= read -r -t 5 line <&3 && printf '%s\n' "$line"
		printf 'a LOGIN %s %s\r\n' "$DEMO_USER" "$DEMO_PASS" >&3
		IFS= read -r -t 5 line <&3 && printf '%s\n' "$line"
		printf 'b LOGOUT\r\n' >&3
		timeout 5 cat <&3 || true
	)
}

s_client_login() {
	# -crlf turns each newline into CRLF.
	printf 'a LOGIN %s %s\nb SELECT INBOX\nc LOGOUT\n' "$DEMO_USER" "$DEMO_PASS" |
		timeout 20 openssl s_client -connect "127.0.0.1:$MG_IMAPS_PORT" -CAfile "$CA_PEM" \
			-verify_return_error -verify_ip 127.0.0.1 -quiet -crlf
}

run_checks() {
	step "Checking mailgate with real clients"
	CHECK_DIR="$WORK/check"
	CHECK_COUNT=0
	rm -rf "$CHECK_DIR"
	mkdir -p "$CHECK_DIR"
	local curl=(curl --silent --show-error --max-time 20 --cacert "$CA_PEM" -u "$DEMO_USER:$DEMO_PASS")
	local imaps="imaps://127.0.0.1:$MG_IMAPS_PORT" imap="imap://127.0.0.1:$MG_IMAP_PORT"

	check "imaps: curl fetches UID 1 (plain text)" "Subject: Welcome to mailgate" \
		"${curl[@]}" "$imaps/INBOX;UID=1"
	check "STARTTLS: curl --ssl-reqd fetches UID 1" "Subject: Welcome to mailgate" \
		"${curl[@]}" --ssl-reqd "$imap/INBOX;UID=1"
	check "imaps: UID 2 arrives as intact UTF-8" "Grüße aus Köln! Die Straße" \
		"${curl[@]}" "$imaps/INBOX;UID=2"
	check "imaps: UID 3 carries the attachment" 'filename="ports.csv"' \
		"${curl[@]}" "$imaps/INBOX;UID=3"
	check "imaps: the INBOX holds 3 messages" "* 3 EXISTS" \
		"${curl[@]}" -X "EXAMINE INBOX" "$imaps/"
	check "openssl s_client: certificate verifies, LOGIN and SELECT work" "b OK" s_client_login
	check_fails "imaps: a wrong password is refused" \
		curl --silent --show-error --max-time 20 --cacert "$CA_PEM" -u "$DEMO_USER:wrong-password" "$imaps/INBOX;UID=1"
	check_fails "imaps: an untrusted certificate is refused (no --cacert)" \
		curl --silent --show-error --max-time 20 -u "$DEMO_USER:$DEMO_PASS" "$imaps/INBOX;UID=1"
	check "STARTTLS port: LOGIN before STARTTLS is refused" "a NO [PRIVACYREQUIRED]" plaintext_login
	check "pop3s: curl lists 3 messages" "3 " \
		"${curl[@]}" "pop3s://127.0.0.1:$MG_POP3S_PORT/"
	check "pop3s: curl retrieves message 1" "Subject: Welcome to mailgate" \
		"${curl[@]}" "pop3s://127.0.0.1:$MG_POP3S_PORT/1"
	check "STLS: curl --ssl-reqd retrieves message 1" "Subject: Welcome to mailgate" \
		"${curl[@]}" --ssl-reqd "pop3://127.0.0.1:$MG_POP3_PORT/1"
	check "admin: /metrics counts the logins" 'mailgate_logins_total{listener="imaps",protocol="imap",result="ok"}' \
		curl --silent --show-error --max-time 20 "http://127.0.0.1:$MG_ADMIN_PORT/metrics"
	check "admin: /readyz says ready" "ready" \
		curl --silent --show-error --max-time 20 "http://127.0.0.1:$MG_ADMIN_PORT/readyz"
	check "admin: the support view of $DEMO_USER lists its POP3 client" '"protocol": "pop3"' \
		curl --silent --show-error --max-time 20 -H "Authorization: Bearer $(cat "$WORK/mailgate/admin-token")" \
		"http://127.0.0.1:$MG_ADMIN_PORT/debug/accounts/$DEMO_USER"

	if ((CHECK_FAILED)); then
		echo
		echo "--- mailgate log ($MG_LOG), last lines ---"
		tail -n 40 "$MG_LOG" || true
		echo "--- Dovecot log ($DC/dovecot.log), last lines ---"
		tail -n 40 "$DC/dovecot.log" || true
		return 1
	fi
	return 0
}

# ---------------------------------------------------------------------------------------
# Main

install_packages
check_rust
build
prepare_workdir
start_dovecot
configure_mailgate

if [[ $MODE == check ]]; then
	start_mailgate "$MG_LOG"
	note "pid $MG_PID, log $MG_LOG"
	rc=0
	run_checks || rc=$?
	stop_mailgate
	if ! grep -q "stopped" "$MG_LOG"; then
		warn "mailgate's log does not end with a clean stop"
	fi
	if grep -qF -- "$DEMO_PASS" "$MG_LOG"; then
		warn "the demo password appears in mailgate's log!"
		rc=1
	fi
	if ((rc == 0)); then
		step "${GREEN}All checks passed${RESET} (outputs in $CHECK_DIR)"
	else
		step "${RED}Some checks failed${RESET} (outputs in $CHECK_DIR)"
	fi
	exit "$rc"
fi

start_mailgate ""
print_instructions
echo
step "mailgate runs in the foreground; Ctrl-C stops it and the demo Dovecot"
rc=0
wait "$MG_PID" || rc=$?
MG_PID=""
exit "$rc"
