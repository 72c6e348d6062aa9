#!/bin/sh
# End-to-end test of the Debian package, as root: build it, dpkg -i, verify the installed
# systemd units, run a server and three peers from the installed binaries, then mount the
# drive with `mount -t fuse.peerstash` and through an /etc/fstab line, write and read a
# file, check ro/uid/gid, umount; finally dpkg -r. Leaves no mount, process, fstab line
# or package behind (also when it fails).
#   sudo packaging/test-deb.sh           # exit 0: passed; prints SKIPPED and exits 0 when
#                                        # it cannot run here (not root, no cargo-deb...)
set -eu
cd "$(dirname "$0")/.."

skip() {
    echo "SKIPPED: $*"
    exit 0
}
[ "$(id -u)" = 0 ] || skip "test-deb.sh needs root (dpkg -i, mount)"
command -v cargo-deb >/dev/null || skip "cargo-deb is not installed (cargo install cargo-deb --locked)"
command -v dpkg >/dev/null || skip "dpkg is missing"
[ -e /dev/fuse ] || skip "no /dev/fuse"
command -v fusermount3 >/dev/null || skip "fuse3 is not installed (apt-get install fuse3)"
installed() { dpkg-query -W -f='${Status}' peerstash 2>/dev/null | grep -q ' installed$'; }
if installed; then
    skip "a peerstash package is already installed; not touching it"
fi
had_user=0
getent passwd peerstash >/dev/null && had_user=1

T=$(mktemp -d /tmp/peerstash-deb.XXXXXX)
PIDS=
FSTAB_MARK="# peerstash-test-deb $T"
cleanup() {
    set +e
    for m in "$T/mnt" "$T/mnt-fstab"; do
        mountpoint -q "$m" && umount "$m"
    done
    if grep -qF "$FSTAB_MARK" /etc/fstab; then
        grep -vF "$FSTAB_MARK" /etc/fstab >"$T/fstab.clean" && cat "$T/fstab.clean" >/etc/fstab
    fi
    for p in $PIDS; do kill "$p" 2>/dev/null; done
    for p in $PIDS; do
        i=0
        while kill -0 "$p" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
        kill -9 "$p" 2>/dev/null
    done
    dpkg-query -W peerstash >/dev/null 2>&1 && dpkg --purge peerstash >/dev/null
    if [ $had_user = 0 ] && getent passwd peerstash >/dev/null; then
        userdel peerstash 2>/dev/null
        getent group peerstash >/dev/null && groupdel peerstash 2>/dev/null
        rmdir /var/lib/peerstash 2>/dev/null
    fi
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
fail() {
    echo "FAILED: $*" >&2
    for f in "$T"/*.log "$T"/alice/mount.log; do
        [ -f "$f" ] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }
    done
    exit 1
}
step() { echo "== $*"; }
# wait_until DESCRIPTION SECONDS COMMAND...
wait_until() {
    what=$1 secs=$2
    shift 2
    i=0
    until "$@" >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -le $((secs * 10)) ] || fail "timed out waiting for $what"
        sleep 0.1
    done
}

step "build the package"
deb=$(packaging/build-deb.sh)
echo "$deb"
dpkg-deb --contents "$deb" | awk '{print $6}' >"$T/contents"
for f in ./usr/bin/peerstash ./usr/bin/peerstash-server ./sbin/mount.fuse.peerstash \
    ./lib/systemd/system/peerstash-server.service ./lib/systemd/system/peerstash-serve.service \
    ./lib/systemd/system/peerstash-serve@.service ./usr/share/man/man1/peerstash.1.gz \
    ./usr/share/man/man1/peerstash-server.1.gz ./usr/share/man/man1/peerstash-mount.1.gz \
    ./etc/peerstash/peerstash-server.toml ./etc/peerstash/peerstash.toml \
    ./usr/share/man/man8/mount.fuse.peerstash.8.gz ./usr/share/doc/peerstash/examples/mnt-backup.mount \
    ./usr/share/doc/peerstash/INSTALL.md; do
    grep -qxF "$f" "$T/contents" || fail "$f is not in the package"
done
dpkg-deb --field "$deb" Depends | grep -q fuse3 || fail "the package does not depend on fuse3"

step "dpkg -i"
dpkg -i "$deb"
getent passwd peerstash >/dev/null || fail "postinst did not create the peerstash user"
[ -x /sbin/mount.fuse.peerstash ] || fail "no /sbin/mount.fuse.peerstash"
peerstash --version
peerstash-server --version

if command -v systemd-analyze >/dev/null; then
    step "systemd-analyze verify (installed units)"
    u=$T/units
    mkdir -p "$u"
    cp /lib/systemd/system/peerstash-server.service /lib/systemd/system/peerstash-serve.service \
        /usr/share/doc/peerstash/examples/mnt-backup.mount \
        /usr/share/doc/peerstash/examples/mnt-backup.automount "$u/"
    ln -s /lib/systemd/system/peerstash-serve@.service "$u/peerstash-serve@alice.service"
    man=no
    command -v man >/dev/null && man=yes
    (cd "$u" && systemd-analyze verify --man=$man peerstash-server.service \
        peerstash-serve.service peerstash-serve@alice.service mnt-backup.mount \
        mnt-backup.automount) >"$T/verify.log" 2>&1 || fail "systemd-analyze verify: $(cat "$T/verify.log")"
    [ -s "$T/verify.log" ] && fail "systemd-analyze verify warned: $(cat "$T/verify.log")"
    echo "verify: clean"
else
    echo "SKIPPED: systemd-analyze verify (systemd-analyze is not installed)"
fi

step "server (from the packaged config) and three peers"
cfg=$T/server.toml
sed -e 's|^# open_registration = false|open_registration = true|' \
    -e 's|^# listen = .*|listen = "127.0.0.1:0"|' /etc/peerstash/peerstash-server.toml >"$cfg"
peerstash-server --config "$cfg" --data-dir "$T/server" >"$T/server.out" 2>"$T/server.log" &
PIDS="$PIDS $!"
wait_until "the server" 30 grep -q '^listening: ' "$T/server.out"
url=$(sed -n 's/^listening: //p' "$T/server.out")
fp=$(sed -n 's/^fingerprint: //p' "$T/server.out")
echo "correct horse battery staple" >"$T/password"
port=17470
for name in alice bob carol; do
    port=$((port + 1))
    peerstash --home "$T/$name" register --server "$url" --server-fingerprint "$fp" \
        --name "$name" --password-file "$T/password" --lend 1G \
        --storage-dir "$T/$name/storage" --listen "127.0.0.1:$port" >/dev/null
    peerstash --home "$T/$name" serve >"$T/serve-$name.log" 2>&1 &
    PIDS="$PIDS $!"
done
wait_until "three peers online" 60 sh -c "peerstash --home '$T/alice' status | grep -q '3 online'"

step "mount -t fuse.peerstash"
mkdir -p "$T/mnt" "$T/mnt-fstab"
mount -t fuse.peerstash "$T/alice" "$T/mnt" -o allow_other,_netdev,cache_size=32M
mountpoint -q "$T/mnt" || fail "not mounted"
findmnt -n -o SOURCE,FSTYPE "$T/mnt" | grep -q "^$T/alice fuse.peerstash" ||
    fail "findmnt: $(findmnt -n "$T/mnt")"
head -c 3000000 /dev/urandom >"$T/original"
cp "$T/original" "$T/mnt/file.bin"
echo hello >"$T/mnt/hello.txt"
sync
cmp "$T/original" "$T/mnt/file.bin" || fail "read back differs"
umount "$T/mnt"
mountpoint -q "$T/mnt" && fail "still mounted after umount"
wait_until "the drive process to exit" 30 sh -c "! pgrep -f -- '[-]-home $T/alice mount $T/mnt' >/dev/null"
echo "round trip through mount -t fuse.peerstash: ok"

step "an /etc/fstab line (ro, uid, gid)"
printf '%s %s fuse.peerstash noauto,_netdev,nofail,x-systemd.automount,ro,uid=65534,gid=65534,allow_other 0 0 %s\n' \
    "$T/alice" "$T/mnt-fstab" "$FSTAB_MARK" >>/etc/fstab
mount "$T/mnt-fstab"
mountpoint -q "$T/mnt-fstab" || fail "the fstab mount is not up"
cmp "$T/original" "$T/mnt-fstab/file.bin" || fail "read back through the fstab mount differs"
[ "$(cat "$T/mnt-fstab/hello.txt")" = hello ] || fail "hello.txt"
[ "$(stat -c %u:%g "$T/mnt-fstab/file.bin")" = 65534:65534 ] || fail "uid/gid: $(stat -c %u:%g "$T/mnt-fstab/file.bin")"
if sh -c 'echo x >"$1"' _ "$T/mnt-fstab/new.txt" 2>"$T/ro.err"; then fail "a write succeeded on a ro mount"; fi
grep -q "Read-only file system" "$T/ro.err" || fail "ro write error: $(cat "$T/ro.err")"
umount "$T/mnt-fstab"
mountpoint -q "$T/mnt-fstab" && fail "still mounted after umount"
grep -vF "$FSTAB_MARK" /etc/fstab >"$T/fstab.clean" && cat "$T/fstab.clean" >/etc/fstab
echo "fstab mount (ro, uid/gid): ok"

step "the data is on the peers (two replicas), and reads back after a remount"
stored=$(du -sb "$T/alice/storage" "$T/bob/storage" "$T/carol/storage" | awk '{s += $1} END {print s}')
[ "$stored" -ge 6000000 ] || fail "expected two replicas of 3 MB on the peers, found $stored bytes"
mount -t fuse.peerstash "$T/alice" "$T/mnt"
cmp "$T/original" "$T/mnt/file.bin" || fail "read back after remount differs"
umount "$T/mnt"

step "dpkg -r"
for p in $PIDS; do kill "$p" 2>/dev/null || true; done
dpkg -r peerstash >/dev/null
[ -e /usr/bin/peerstash ] && fail "/usr/bin/peerstash still there after dpkg -r"
[ -e /sbin/mount.fuse.peerstash ] && fail "the mount helper is still there after dpkg -r"
dpkg --purge peerstash >/dev/null
echo "PASSED: packaging/test-deb.sh"
