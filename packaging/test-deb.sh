#!/usr/bin/env bash
# Tests the Debian package on this machine, as root, and leaves the machine as it found it:
#
#   1. builds it (packaging/build-deb.sh; or takes the .deb given as $1) and runs lintian:
#      no errors allowed, every finding printed;
#   2. checks its contents: both binaries in /usr/bin, the unit, the sysusers entry, the
#      conffile /etc/gptossd/gptossd.toml, the README, the state directory;
#   3. installs it with dpkg -i (then apt-get install -f if dependencies are missing) and checks
#      what postinst did: the gptossd system user (no login, home /var/lib/gptossd, in the
#      video/render groups that exist), /var/lib/gptossd and its models/ owned by it, the
#      service neither enabled nor started, the first-install message printed;
#   4. runs gptossd --version, then as the gptossd user makes the tiny test model in
#      /var/lib/gptossd/models/tiny and generates 4 greedy tokens with it, in one process (the
#      packaged gptossd-stage generate) and through the pipeline (gptossd generate --stages 1):
#      the same tokens both ways;
#   5. edits the conffile, reinstalls the package, and checks the edit survived (no .dpkg-new,
#      no prompt) and the install is still sound;
#   6. purges it (dpkg --purge) and checks that nothing of it is left: files, /etc/gptossd,
#      /var/lib/gptossd, systemd state. The gptossd user outlives a purge by design (see
#      packaging/debian/postrm); this test removes it if it created it.
#
# Exits non-zero at the first failed check. Refuses to run where gptossd is installed or has
# left files. Needs dpkg-deb, lintian, runuser and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; }
fail() {
    printf 'FAILED: %s\n' "$*" >&2
    exit 1
}
status() { dpkg-query -W -f='${Status}' gptossd 2>/dev/null || true; }
# Paths the package or its scripts create; none may exist before, or after the purge.
owned_paths=(/usr/bin/gptossd /usr/bin/gptossd-stage /lib/systemd/system/gptossd.service
    /usr/lib/sysusers.d/gptossd.conf /etc/gptossd /usr/share/doc/gptossd /usr/share/gptossd
    /usr/share/man/man1/gptossd.1.gz /usr/share/man/man1/gptossd-stage.1.gz /var/lib/gptossd)
systemd_leftovers() {
    find /etc/systemd /var/lib/systemd -name '*gptossd*' 2>/dev/null || true
}

[ "$(id -u)" = 0 ] || fail "run as root: it installs and purges the package"
for tool in dpkg-deb lintian runuser python3; do
    command -v "$tool" >/dev/null || fail "$tool is missing (apt-get install lintian util-linux python3)"
done
case "$(status)" in
"" | "unknown ok not-installed") ;;
*) fail "gptossd is already on this machine ($(status)): this test would remove it" ;;
esac
for path in "${owned_paths[@]}"; do
    [ ! -e "$path" ] || fail "$path exists already: this test would remove it"
done
[ -z "$(systemd_leftovers)" ] || fail "systemd already has gptossd state: $(systemd_leftovers)"
user_existed=no
group_existed=no
getent passwd gptossd >/dev/null && user_existed=yes
getent group gptossd >/dev/null && group_existed=yes

work=$(mktemp -d)
cleanup() {
    local rc=$?
    trap - EXIT
    if [ -n "$(status)" ] && [ "$(status)" != "unknown ok not-installed" ]; then
        echo "cleanup: purging gptossd" >&2
        dpkg --purge gptossd >/dev/null 2>&1 || true
    fi
    if [ "$user_existed" = no ] && getent passwd gptossd >/dev/null; then
        userdel gptossd || true
    fi
    if [ "$group_existed" = no ] && getent group gptossd >/dev/null; then
        groupdel gptossd || true
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT

step "build and lintian"
if [ $# -ge 1 ]; then
    deb=$1
else
    deb=$(packaging/build-deb.sh | tail -n 1)
fi
[ -f "$deb" ] || fail "no package at '$deb'"
version=$(dpkg-deb -f "$deb" Version)
ok "$deb: version $version, Depends: $(dpkg-deb -f "$deb" Depends)"
lintian --pedantic --display-info "$deb" >"$work/lintian" 2>&1 || true
grep -v 'running with root privileges' "$work/lintian" | sed 's/^/  lintian: /' || true
grep -q '^E: ' "$work/lintian" && fail "lintian reports errors"
ok "lintian: no errors ($(grep -c '^W: ' "$work/lintian" || true) warnings)"

step "contents"
dpkg-deb -c "$deb" | awk '{ print $6 }' | sed 's|^\./|/|' >"$work/contents"
for path in /usr/bin/gptossd /usr/bin/gptossd-stage /lib/systemd/system/gptossd.service \
    /usr/lib/sysusers.d/gptossd.conf /etc/gptossd/gptossd.toml /usr/share/doc/gptossd/README.md \
    /usr/share/doc/gptossd/copyright /var/lib/gptossd/; do
    grep -qx "$path" "$work/contents" || fail "$path is not in the package"
done
ok "binaries, unit, sysusers entry, config, README and state directory are in the package"
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/gptossd/gptossd.toml ||
    fail "/etc/gptossd/gptossd.toml is not a conffile"
ok "/etc/gptossd/gptossd.toml is a conffile"

step "install"
export DEBIAN_FRONTEND=noninteractive
if ! dpkg -i "$deb" >"$work/install.log" 2>&1 </dev/null; then
    echo "dpkg -i failed; apt-get install -f for the dependencies:"
    apt-get install -f -y >>"$work/install.log" 2>&1 </dev/null || {
        cat "$work/install.log"
        fail "apt-get install -f"
    }
fi
sed 's/^/  | /' "$work/install.log"
[ "$(status)" = "install ok installed" ] || fail "dpkg status is '$(status)'"
ok "installed"
grep -q 'not started: no model is in place yet' "$work/install.log" || fail "no first-install message"
grep -q '/var/lib/gptossd/models/gpt-oss-20b' "$work/install.log" || fail "the message says nowhere to put the model"
grep -q 'systemctl enable --now gptossd' "$work/install.log" || fail "the message says not how to start"
ok "the first-install message says where the model goes and how to start the service"

IFS=: read -r _ _ uid _ _ home shell < <(getent passwd gptossd) || fail "no gptossd user"
[ "$uid" -lt 1000 ] || fail "gptossd has uid $uid: not a system user"
[ "$home" = /var/lib/gptossd ] || fail "gptossd's home is $home"
[ "$shell" = /usr/sbin/nologin ] || fail "gptossd's shell is $shell"
ok "system user gptossd: uid $uid, home $home, shell $shell"
groups=" $(id -nG gptossd) "
for group in video render; do
    if getent group "$group" >/dev/null; then
        [[ $groups == *" $group "* ]] || fail "gptossd is not in the $group group"
        ok "gptossd is in the $group group"
    else
        ok "no $group group on this machine"
    fi
done
for dir in /var/lib/gptossd /var/lib/gptossd/models; do
    [ "$(stat -c %U:%G "$dir")" = gptossd:gptossd ] || fail "$dir is owned by $(stat -c %U:%G "$dir")"
done
ok "/var/lib/gptossd and its models/ belong to gptossd"
[ ! -e /etc/systemd/system/multi-user.target.wants/gptossd.service ] || fail "the service was enabled"
pgrep -u gptossd >/dev/null && fail "a process of gptossd runs: the service was started"
ok "the service is neither enabled nor started"
ok "systemd state recorded for a later purge: $(systemd_leftovers | tr '\n' ' ')"

step "run"
[ "$(command -v gptossd)" = /usr/bin/gptossd ] || fail "gptossd on PATH is $(command -v gptossd)"
[ "$(gptossd --version)" = "gptossd $version" ] || fail "gptossd --version says $(gptossd --version)"
ok "gptossd --version: $(gptossd --version)"
# With the binary in place, the installed unit passes systemd's own checks.
systemd-analyze verify /lib/systemd/system/gptossd.service || fail "systemd-analyze verify"
ok "systemd-analyze verify: the installed unit is valid"
model=/var/lib/gptossd/models/tiny
(cd /var/lib/gptossd && runuser -u gptossd -- gptossd make-test-model --preset tiny --out "$model") ||
    fail "make-test-model as gptossd"
[ "$(stat -c %U "$model/config.json")" = gptossd ] || fail "the test model is not gptossd's"
ok "the gptossd user made the tiny test model in $model"
generate=(gptossd generate --model "$model" --prompt-tokens "1,2,3" --max-tokens 4 --temperature 0 --json)
(cd /var/lib/gptossd && runuser -u gptossd -- "${generate[@]}") >"$work/in-process.json" ||
    fail "gptossd generate as gptossd"
(cd /var/lib/gptossd && runuser -u gptossd -- "${generate[@]}" --stages 1) >"$work/pipeline.json" \
    2>"$work/pipeline.log" || {
    cat "$work/pipeline.log"
    fail "gptossd generate --stages 1 as gptossd"
}
python3 - "$work/in-process.json" "$work/pipeline.json" <<'EOF' || fail "generate's output"
import json, sys
a, b = (json.load(open(path)) for path in sys.argv[1:])
assert a["prompt_tokens"] == [1, 2, 3], a
assert len(a["tokens"]) == 4 and a["finish_reason"] == "length", a
assert b["tokens"] == a["tokens"], (a, b)
print(f"ok: generated {a['tokens']} ({a['text']!r}), the same through the stage worker")
EOF

step "the conffile survives a reinstall"
conf=/etc/gptossd/gptossd.toml
sed -i 's/^#port = 8080$/port = 8091/' "$conf"
grep -qx 'port = 8091' "$conf" || fail "could not edit $conf"
dpkg -i "$deb" >"$work/reinstall.log" 2>&1 </dev/null || {
    cat "$work/reinstall.log"
    fail "reinstall"
}
[ "$(status)" = "install ok installed" ] || fail "dpkg status is '$(status)' after the reinstall"
grep -qx 'port = 8091' "$conf" || fail "the local edit of $conf was lost"
for suffix in dpkg-new dpkg-dist dpkg-old; do
    [ ! -e "$conf.$suffix" ] || fail "$conf.$suffix appeared"
done
ok "the edit of $conf survived, with no .dpkg-new/.dpkg-dist"
grep -q 'not started' "$work/reinstall.log" && fail "the first-install message came again"
if [ "$(stat -c %U:%G /var/lib/gptossd)" != gptossd:gptossd ] || [ ! -f "$model/config.json" ]; then
    fail "the reinstall changed /var/lib/gptossd"
fi
ok "the reinstall kept the user, the state directory and the model"

step "purge"
dpkg --purge gptossd >"$work/purge.log" 2>&1 || {
    cat "$work/purge.log"
    fail "dpkg --purge"
}
sed 's/^/  | /' "$work/purge.log"
case "$(status)" in
"" | "unknown ok not-installed") ;;
*) fail "dpkg status is '$(status)' after the purge" ;;
esac
for path in "${owned_paths[@]}"; do
    [ ! -e "$path" ] || fail "$path is left after the purge"
done
[ -z "$(systemd_leftovers)" ] || fail "systemd state left: $(systemd_leftovers)"
ok "purged: no file, directory or systemd state of gptossd is left"
if [ "$user_existed" = no ]; then
    userdel gptossd
    getent group gptossd >/dev/null && [ "$group_existed" = no ] && groupdel gptossd
    ok "removed the gptossd user and group this test created (a purge keeps them)"
fi

printf '\nAll package checks passed.\n'
