#!/bin/sh
# Boot test of the Debian package under a real systemd (PID 1), as root: the ways
# docs/INSTALL.md gives to mount the drive at boot, each across a reboot of a container.
#
#   sudo packaging/test-boot.sh      # exit 0: passed; prints SKIPPED and exits 0 when it
#                                    # cannot run here (not root, no debootstrap or
#                                    # systemd-nspawn, no mirror, nspawn cannot boot)
#
# It builds the .deb (packaging/build-deb.sh), makes a Debian 12 root with debootstrap
# from the host's Debian mirror (cached in $CARGO_TARGET_DIR/boot-root: about 215 MB and
# 75 s on 2 cores, once; made again when the package list below changes), copies it
# (another 215 MB while the test runs), and boots the copy with `systemd-nspawn -b` on a
# private network; six boots take about 50 s. The server, the drive's home and two more
# peers run there as the packaged services, on the container's loopback. Boots, in order:
#   1. install the .deb, server + 3 peers; the example mnt-backup.mount enabled; an
#      unregistered peerstash-serve@ghost gives up after a few tries
#   2. the .mount came up at boot; the previous shutdown unmounted the drive before the
#      server and the peers stopped; stop with an upload pending; the backup job runs
#      into the drive and refuses a drive that cannot mount; an upload left pending
#      (two peers stopped); then the documented fstab line, with nothing providing
#      network-online.target
#   3. the fstab line mounted and boot finished; the pending upload completes; install
#      ifupdown (a network-online provider)
#   4. the fstab line with ifupdown; then the example automount
#   5. the automount with ifupdown: no ordering cycle; active and the first access mounts
#      (skipped, with a message, where the kernel has no autofs); then setuid=peerstash
#   6. setuid=peerstash after root mounts; apt-get remove unmounts and stops everything;
#      apt-get purge leaves no enable link
# Leaves no container, mount or process behind (also when it fails). The copy and the
# logs live in a run directory under the cache, removed at the end (kept on failure when
# KEEP=1). PEERSTASH_DEB=FILE tests that package instead of building one.
set -eu
cd "$(dirname "$0")/.."

skip() {
    echo "SKIPPED: test-boot.sh: $*"
    exit 0
}
[ "$(id -u)" = 0 ] || skip "needs root (debootstrap, systemd-nspawn)"
for c in debootstrap systemd-nspawn nsenter; do
    command -v $c >/dev/null ||
        skip "$c is missing (apt-get install debootstrap systemd-container util-linux)"
done
[ -n "${PEERSTASH_DEB:-}" ] || command -v cargo-deb >/dev/null || skip "cargo-deb is not installed (cargo install cargo-deb --locked)"
[ -c /dev/fuse ] || skip "no /dev/fuse to hand to the container"

target=${CARGO_TARGET_DIR:-target}
mkdir -p "$target"
target=$(cd "$target" && pwd)
cache=$target/boot-root
suite=bookworm
base=$cache/$suite
# ifupdown is installed by debootstrap, then purged: its .deb stays in the root's apt
# cache, so the container (which has no network) can install it for boot 4.
packages=systemd-sysv,fuse3,procps,rsync,ifupdown
stamp="$suite $packages 2"

T=
NSPAWN=
CPID=
cleanup() {
    set +e
    if [ -n "$NSPAWN" ] && kill -0 "$NSPAWN" 2>/dev/null; then
        # SIGTERM asks nspawn for a clean poweroff of the container; then force it.
        kill "$NSPAWN"
        wait_until 30 nspawn_gone
        kill -9 "$NSPAWN" 2>/dev/null
        [ -n "$CPID" ] && kill -9 "$CPID" 2>/dev/null
        wait "$NSPAWN" 2>/dev/null
    fi
    if [ -n "$T" ]; then
        # nspawn's mounts live in its own namespace; nothing of it stays on the host, but
        # do not delete through a mount if one were left.
        if grep -qF " $T/" /proc/self/mounts; then
            echo "test-boot.sh: mounts left under $T, not removing it" >&2
        elif [ "${KEEP:-0}" = 1 ] && [ "$failed" = 1 ]; then
            echo "test-boot.sh: kept $T" >&2
        else
            rm -rf "$T"
        fi
    fi
}
failed=0
trap cleanup EXIT
trap 'exit 1' INT TERM

step() { echo "== $*"; }
fail() {
    failed=1
    echo "FAILED: test-boot.sh: $*" >&2
    if [ -n "$CPID" ] && kill -0 "$CPID" 2>/dev/null; then
        echo "--- container: jobs, failed units, journal tail" >&2
        ct systemctl list-jobs --no-pager >&2 || true
        ct systemctl --failed --no-pager >&2 || true
        ct journalctl -b --no-pager -n 25 >&2 || true
        ct sh -c 'tail -n 20 /var/lib/peerstash/default/mount.log' >&2 || true
    elif [ -n "$T" ] && [ -f "$T/boot$n.log" ]; then
        echo "--- console of boot $n" >&2
        tail -n 30 "$T/boot$n.log" >&2
    fi
    exit 1
}
# A broken case: reported, and the run goes on to the other cases (exit 1 at the end).
broken() {
    failed=1
    broken=$((broken + 1))
    echo "FAILED: test-boot.sh: $*" >&2
}
broken=0
# wait_until SECONDS COMMAND...: until COMMAND succeeds; non-zero after SECONDS.
wait_until() {
    secs=$1
    shift
    i=0
    until "$@" >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -le $((secs * 10)) ] || return 1
        sleep 0.1
    done
}

step "the Debian root (cache: $base)"
mkdir -p "$cache"
if [ "$(cat "$base.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$base" "$base.tmp" "$base.stamp"
    # The host's own Debian mirror (what apt here already uses); debootstrap's default
    # otherwise.
    mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Identifier: Packages' 2>/dev/null |
        awk -v s=$suite '$2 == s {print $1; exit}')
    echo "debootstrap $suite ${mirror:-(default mirror)}: about a minute, once"
    if ! debootstrap --variant=minbase --include=$packages $suite "$base.tmp" $mirror \
        >"$cache/debootstrap.log" 2>&1; then
        tail -n 5 "$cache/debootstrap.log"
        rm -rf "$base.tmp"
        skip "debootstrap failed (no Debian mirror reachable?); log: $cache/debootstrap.log"
    fi
    chroot "$base.tmp" dpkg --purge ifupdown >/dev/null 2>&1
    ls "$base.tmp"/var/cache/apt/archives/ifupdown_*.deb >/dev/null
    # Only ifupdown's .deb is needed later.
    find "$base.tmp/var/cache/apt/archives" -name '*.deb' ! -name 'ifupdown_*' -delete
    mv "$base.tmp" "$base"
    echo "$stamp" >"$base.stamp"
fi

if [ -n "${PEERSTASH_DEB:-}" ]; then
    # A .deb built elsewhere (e.g. of an older commit, to see this test fail on it).
    deb=$PEERSTASH_DEB
else
    step "build the package"
    deb=$(packaging/build-deb.sh)
fi
echo "$deb"

T=$(mktemp -d "$cache/run.XXXXXX")
R=$T/root
cp -a --reflink=auto "$base" "$R"
echo peerstash-boot >"$R/etc/hostname"
# A fixed machine id keeps the journal of the previous boot readable (journalctl -b -1).
systemd-machine-id-setup --root="$R" >/dev/null
cp "$deb" "$R/root/peerstash.deb"
# Test data, made on the host; the drive's content is compared with these.
for f in data1 data2 data3 data4; do head -c 1500000 /dev/urandom >"$R/root/$f"; done
n=0
# The container's /dev/fuse: a node of its own, mode 0666 as udev makes it on a Debian
# machine (a bind of the host's, which may be 0600 here, would keep the host's mode, and
# fusermount3 could then not open it for a setuid= mount).
mknod -m 0666 "$T/fuse" c "$(printf %d "0x$(stat -c %t /dev/fuse)")" \
    "$(printf %d "0x$(stat -c %T /dev/fuse)")"

# Commands in the booted container (all its namespaces, its root, a clean environment).
ct() {
    nsenter -t "$CPID" -a -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 "$@"
}
container_pid1() {
    CPID=$(pgrep -P "$NSPAWN" -x systemd) && [ -n "$CPID" ]
}
nspawn_gone() { ! kill -0 "$NSPAWN" 2>/dev/null; }
# The container's systemd is up (CPID set), or nspawn gave up.
pid1_or_gone() { container_pid1 || nspawn_gone; }
# PID 1 answers (any state: is-system-running exits non-zero for "degraded" too).
systemd_answers() {
    [ -n "$(ct systemctl is-system-running 2>/dev/null)" ]
}
# boot: start the container and wait until its boot finished (is-system-running).
boot() {
    n=$((n + 1))
    step "boot $n"
    systemd-nspawn -q -D "$R" -b -M peerstash-boot --register=no --keep-unit \
        --bind="$T/fuse:/dev/fuse" $autofs --private-network --console=read-only \
        >"$T/boot$n.log" 2>&1 &
    NSPAWN=$!
    CPID=
    wait_until 30 pid1_or_gone || fail "the container's systemd did not start within 30 s"
    if [ -z "$CPID" ]; then
        NSPAWN=
        [ $n = 1 ] && skip "systemd-nspawn cannot boot here: $(tail -n 3 "$T/boot$n.log")"
        fail "systemd-nspawn exited: $(tail -n 5 "$T/boot$n.log")"
    fi
    wait_until 30 systemd_answers || fail "timed out after 30 s waiting for the container's systemd to answer"
    # A boot that hangs (a job waiting for ever) never gets past "starting".
    state=$(ct timeout 120 systemctl is-system-running --wait) ||
        state=$(ct systemctl is-system-running) || true
    if [ -z "$state" ] && ! nspawn_gone; then
        # No answer at all, the container still there: once in a full CI run its bus
        # socket was not found right after boot ("Failed to connect to bus"), and the next
        # boot was fine. Find PID 1 again and ask once more; a boot that hangs still
        # answers "starting" and fails below.
        echo "no answer from the container's systemd; asking again"
        container_pid1 || true
        wait_until 30 systemd_answers || true
        state=$(ct timeout 120 systemctl is-system-running --wait) ||
            state=$(ct systemctl is-system-running) || true
    fi
    case $state in
    running) ;;
    *)
        [ $n = 1 ] && skip "the container did not boot cleanly ($state): $(ct systemctl --failed --no-legend)"
        broken "boot $n: the system is '${state:-no answer}', not running (waited up to 120 s)"
        ;;
    esac
    echo "booted ($state)"
    # systemd breaks an ordering cycle by skipping a unit, and boots on.
    if cycle=$(ct journalctl -b -o cat _PID=1 | grep -i -m3 'ordering cycle'); then
        broken "boot $n: $cycle"
    fi
}
# shutdown VERB: reboot or poweroff, and wait until nspawn is gone.
shutdown() {
    # What `systemctl reboot` does, minus its query to logind (no D-Bus in the container).
    ct systemctl start --no-block --job-mode=replace-irreversibly "$1.target"
    wait_until 120 nspawn_gone || fail "the container did not $1 within 120 s"
    wait "$NSPAWN" || true
    NSPAWN=
    CPID=
}
reboot() {
    shutdown reboot
    boot
}
# drive_mounted: the drive is mounted at /mnt/backup (FUSE, not the automount's autofs).
drive_mounted() {
    ct findmnt -n -t fuse.peerstash /mnt/backup >/dev/null
}
# check_data FILE...: each reads back byte for byte through the mount.
check_data() {
    for f in "$@"; do
        ct cmp "/root/$f" "/mnt/backup/$f" || broken "/mnt/backup/$f differs from what was written"
    done
}
ps_home() { ct peerstash --home /var/lib/peerstash/default "$@"; }
# Nothing left to upload ("0 uploads" in older builds, "none" in newer ones).
settled() { ps_home status | grep -Eq '^pending: *(0 uploads|none)'; }
# The drive process serving /mnt/backup: PID and uid.
drive_ps() { ct ps -o pid=,uid=,args= -C peerstash | awk '/ mount \/mnt\/backup/ {print $1, $2; exit}'; }

if [ -c /dev/autofs ] && grep -qw autofs /proc/filesystems; then
    autofs=--bind=/dev/autofs
else
    autofs=
fi

boot

step "install the package; a server and three peers as the packaged services"
ct dpkg -i /root/peerstash.deb >"$T/dpkg.log" 2>&1 || fail "dpkg -i: $(tail -n 5 "$T/dpkg.log")"
ct sed -i -e 's|^# listen = .*|listen = "127.0.0.1:7400"|' \
    -e 's|^# open_registration = false|open_registration = true|' /etc/peerstash/peerstash-server.toml
ct systemctl enable --now peerstash-server >/dev/null 2>&1
# As INSTALL.md reads the fingerprint.
fp_of() { ct sh -c "journalctl -u peerstash-server -o cat | grep -m1 '^fingerprint:'"; }
wait_until 30 fp_of || fail "timed out after 30 s waiting for the server's fingerprint in the journal"
fp=$(fp_of | sed 's/^fingerprint: //')
ct sh -c 'echo "correct horse battery staple" >/var/lib/peerstash/password && chown peerstash /var/lib/peerstash/password'
port=7420
for name in default bob carol; do
    port=$((port + 1))
    ct runuser -u peerstash -- peerstash --home /var/lib/peerstash/$name register \
        --server https://127.0.0.1:7400 --server-fingerprint "$fp" --name "$name" \
        --password-file /var/lib/peerstash/password --lend 1G \
        --storage-dir /var/lib/peerstash/$name/storage --listen 127.0.0.1:$port \
        >"$T/register-$name.log" 2>&1 || fail "register $name: $(cat "$T/register-$name.log")"
done
ct systemctl enable --now peerstash-serve peerstash-serve@bob peerstash-serve@carol >/dev/null 2>&1
# An instance nobody registered: it must give up, not restart every 5 s for ever.
ct systemctl start --no-block peerstash-serve@ghost
three_online() { ps_home status | grep -q ' 3 online'; }
wait_until 60 three_online || fail "timed out after 60 s waiting for three peers online"

step "the example mnt-backup.mount (INSTALL.md), enabled"
ct mkdir -p /mnt/backup
ct cp /usr/share/doc/peerstash/examples/mnt-backup.mount \
    /usr/share/doc/peerstash/examples/mnt-backup.automount /etc/systemd/system/
ct systemctl daemon-reload
ct systemctl enable --now mnt-backup.mount >/dev/null 2>&1 || fail "systemctl enable --now mnt-backup.mount"
drive_mounted || broken "mnt-backup.mount is active but nothing is mounted"
ct cp /root/data1 /mnt/backup/data1
wait_until 60 settled || broken "timed out after 60 s waiting for data1 on the peers"
check_data data1

step "the unregistered peerstash-serve@ghost gave up"
ghost() { ct systemctl show -P "$1" peerstash-serve@ghost.service; }
ghost_failed() { [ "$(ghost ActiveState)" = failed ]; }
wait_until 60 ghost_failed || broken "timed out after 60 s waiting for peerstash-serve@ghost to stop restarting"
echo "ghost: $(ghost Result), $(ghost NRestarts) restarts"
[ "$(ghost NRestarts)" -le 5 ] || broken "peerstash-serve@ghost restarted $(ghost NRestarts) times"
ct journalctl -u peerstash-serve@ghost -o cat | grep -q 'holds no peer' ||
    broken "peerstash-serve@ghost did not log why it stopped"

reboot

step "the .mount at boot"
drive_mounted || broken "mnt-backup.mount did not mount at boot"
check_data data1
# mount --daemon leaves the drive in mount(8)'s process group until the mount is up (an
# automount lets only that group through meanwhile), then gives it a session of its own.
pid=$(drive_ps | cut -d' ' -f1)
[ -n "$pid" ] && [ "$(ct ps -o sid= -p "$pid" | tr -d ' ')" = "$pid" ] ||
    broken "the drive (pid ${pid:-none}) did not start a session of its own once mounted"

# shutdown_order: at the previous shutdown the drive unmounted before the server and the
# peers stopped (PID 1's own messages of the previous boot, in order).
shutdown_order() {
    ct journalctl -b -1 _PID=1 -o cat --no-pager >"$T/shutdown.log"
    unmounted=$(grep -n -m1 '^Unmounted mnt-backup.mount' "$T/shutdown.log" | cut -d: -f1)
    if [ -z "$unmounted" ]; then
        broken "no 'Unmounted mnt-backup.mount' in the previous boot's journal"
        return
    fi
    for u in peerstash-server.service peerstash-serve.service peerstash-serve@bob.service; do
        stopping=$(grep -n -m1 "^Stopping $u" "$T/shutdown.log" | cut -d: -f1)
        if [ -z "$stopping" ]; then
            broken "no 'Stopping $u' in the previous boot's journal"
        elif [ "$stopping" -lt "$unmounted" ]; then
            broken "$u stopped before the drive unmounted: $(grep -E "^(Stopping|Unmounted) (peerstash|mnt-backup)" "$T/shutdown.log")"
        fi
    done
}

step "shutdown order (the .mount): the drive unmounted before the server and the peers stopped"
shutdown_order

# write_pending FILE: with bob and carol stopped, FILE is written and waits for them.
write_pending() {
    ct systemctl stop peerstash-serve@bob peerstash-serve@carol
    ct cp "/root/$1" "/mnt/backup/$1"
    ps_home status | grep -q '^pending: *[1-9]' || broken "expected pending uploads: $(ps_home status)"
}

step "stop with an upload pending"
write_pending data2
ct timeout 60 systemctl stop mnt-backup.mount || broken "systemctl stop mnt-backup.mount with an upload pending"
drive_mounted && broken "still mounted after systemctl stop"
ct systemctl start peerstash-serve@bob peerstash-serve@carol mnt-backup.mount
wait_until 90 settled || broken "timed out after 90 s waiting for the pending upload to resume after the remount"
check_data data1 data2

step "the backup job (INSTALL.md): into the drive, never into a bare /mnt/backup"
# The two unit files as INSTALL.md writes them (the container's root is a plain directory
# here).
for u in backup-home.service backup-home.timer; do
    sed -n "\|tee /etc/systemd/system/$u .*<<'UNIT'\$|,/^UNIT\$/p" docs/INSTALL.md |
        sed '1d;$d' >"$R/etc/systemd/system/$u"
    [ -s "$R/etc/systemd/system/$u" ] || fail "no $u in docs/INSTALL.md"
done
ct mkdir -p /home/alice
ct cp /root/data3 /home/alice/notes
ct systemctl daemon-reload
ct systemctl enable backup-home.timer >/dev/null 2>&1 || broken "systemctl enable backup-home.timer"
ct systemctl start backup-home.service || broken "backup-home.service failed with the drive mounted"
ct cmp /root/data3 /mnt/backup/home/alice/notes || broken "backup-home.service did not back up into the drive"
# A drive that cannot mount (its home lost its config): the job must not run.
ct systemctl stop mnt-backup.mount
ct mv /var/lib/peerstash/default/config.toml /root/config.toml
ct systemctl start backup-home.service 2>/dev/null &&
    broken "backup-home.service ran although the drive could not mount"
[ -z "$(ct ls -A /mnt/backup)" ] || broken "the backup wrote into the bare /mnt/backup"
ct mv /root/config.toml /var/lib/peerstash/default/config.toml
ct systemctl disable backup-home.timer >/dev/null 2>&1
ct systemctl reset-failed mnt-backup.mount 2>/dev/null || true
ct systemctl start mnt-backup.mount

step "an upload pending across a reboot"
write_pending data4

step "the fstab line (INSTALL.md), nothing provides network-online.target"
ct systemctl disable --now mnt-backup.mount >/dev/null 2>&1
# A unit file in /etc/systemd/system would shadow the unit fstab generates: the line is
# instead of the example units, as INSTALL.md says.
ct rm /etc/systemd/system/mnt-backup.mount /etc/systemd/system/mnt-backup.automount
fstab_line=$(sed -n "s|^echo '\(/var/lib/peerstash/default /mnt/backup fuse.peerstash [^']*\)' .*/etc/fstab\$|\1|p" docs/INSTALL.md)
[ -n "$fstab_line" ] || fail "no fstab line found in docs/INSTALL.md"
echo "$fstab_line"
ct sh -c "echo '$fstab_line' >>/etc/fstab"
ct systemctl daemon-reload

reboot

step "the fstab line at boot, without network-online provider"
[ "$(ct systemctl show -P SourcePath mnt-backup.mount)" = /etc/fstab ] ||
    broken "mnt-backup.mount is not the unit generated from /etc/fstab"
drive_mounted || broken "the fstab line did not mount at boot"
wait_until 90 settled || broken "timed out after 90 s waiting for the upload pending at the reboot"
check_data data1 data2 data4

step "install ifupdown (provides network-online.target)"
ct sh -c 'dpkg -i /var/cache/apt/archives/ifupdown_*.deb' >"$T/ifupdown.log" 2>&1 ||
    fail "dpkg -i ifupdown: $(tail -n 5 "$T/ifupdown.log")"

reboot

step "the fstab line at boot, with ifupdown"
echo "shutdown order (the fstab line)"
shutdown_order
[ "$(ct systemctl is-active networking.service)" = active ] || broken "networking.service is not active"
drive_mounted || broken "the fstab line did not mount at boot with ifupdown"
check_data data1 data2

step "the example automount (INSTALL.md), with ifupdown"
ct sed -i '\|^/var/lib/peerstash/default /mnt/backup |d' /etc/fstab
ct cp /usr/share/doc/peerstash/examples/mnt-backup.mount \
    /usr/share/doc/peerstash/examples/mnt-backup.automount /etc/systemd/system/
ct systemctl daemon-reload
ct systemctl enable mnt-backup.automount >/dev/null 2>&1

reboot

step "the automount with ifupdown: no ordering cycle"
# Checked with the units of this system (ifupdown's networking.service orders after
# local-fs.target, which an automount orders before): also where systemd cannot run
# automounts, as in a container on a kernel without autofs.
ct systemd-analyze verify --man=no mnt-backup.automount networking.service local-fs.target \
    >"$T/verify-automount.log" 2>&1 || true
if grep -qi 'ordering cycle\|cyclic' "$T/verify-automount.log"; then
    broken "mnt-backup.automount: $(grep -i -m3 'ordering cycle\|cyclic' "$T/verify-automount.log")"
fi
if [ -n "$autofs" ]; then
    step "the automount at boot, with ifupdown; the first access mounts"
    [ "$(ct systemctl is-active mnt-backup.automount)" = active ] || broken "mnt-backup.automount is not active"
    drive_mounted && broken "mounted before the first access"
    start=$(date +%s)
    ct timeout 40 cmp /root/data1 /mnt/backup/data1 || broken "the first access through the automount failed"
    echo "first access: $(($(date +%s) - start)) s"
    [ $(($(date +%s) - start)) -lt 20 ] || broken "the first access took $(($(date +%s) - start)) s"
    drive_mounted || broken "the automount did not mount the drive"
else
    echo "SKIPPED: the automount (this kernel has no autofs: /dev/autofs or autofs in /proc/filesystems missing)"
fi
ct systemctl disable --now mnt-backup.automount >/dev/null 2>&1
ct systemctl stop mnt-backup.mount

step "setuid=peerstash (INSTALL.md), after the root mounts above"
ct sed -i 's/^Options=/Options=setuid=peerstash,/' /etc/systemd/system/mnt-backup.mount
ct sed -i 's/^#user_allow_other/user_allow_other/' /etc/fuse.conf
ct systemctl daemon-reload
ct systemctl enable mnt-backup.mount >/dev/null 2>&1

reboot

step "setuid=peerstash at boot"
drive_mounted || broken "the setuid=peerstash mount did not come up at boot"
uid=$(drive_ps | cut -d' ' -f2)
[ "$uid" = "$(ct id -u peerstash)" ] || broken "the drive runs as uid '$uid', not peerstash"
check_data data1 data2
ct cp /root/data3 /mnt/backup/data3
wait_until 60 settled || broken "timed out after 60 s waiting for data3 on the peers"

step "apt-get remove: the drive unmounts, every peerstash process stops"
if ! drive_mounted; then
    # setuid broke above: mount as root, so that this case is still tested.
    ct sed -i 's/^Options=setuid=peerstash,/Options=/' /etc/systemd/system/mnt-backup.mount
    ct systemctl daemon-reload
    ct systemctl start mnt-backup.mount || true
    drive_mounted || fail "cannot test apt-get remove: the drive does not mount"
fi
ct apt-get remove -y peerstash >"$T/remove.log" 2>&1 || fail "apt-get remove: $(tail -n 5 "$T/remove.log")"
drive_mounted && broken "the drive is still mounted after apt-get remove"
left=$(ct pgrep -a peerstash) && broken "processes left after apt-get remove: $left"

step "apt-get purge: no enable link left"
ct apt-get purge -y peerstash >"$T/purge.log" 2>&1 || fail "apt-get purge: $(tail -n 5 "$T/purge.log")"
links=$(ct find /etc/systemd/system -name 'peerstash*') && [ -n "$links" ] &&
    broken "left after purge: $links"

shutdown poweroff
[ $broken = 0 ] || {
    echo "FAILED: test-boot.sh: $broken checks failed (above)" >&2
    exit 1
}
echo "PASSED: packaging/test-boot.sh"
