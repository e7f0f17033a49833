#!/usr/bin/env bash
# Run by tests/tests/packaging.rs as `unshare --mount --pid --fork --kill-child bash -c THIS
# clean-root ROOT DEB`: builds a minimal Debian 12 root in ROOT (as deploy/cleanroom does),
# installs DEB the way an administrator would, checks it there, purges it and lists what is left.
# Its own mount and PID namespaces take every mount and process with them when it ends; the test
# deletes ROOT.
set -euo pipefail
root=$1 deb=$2
mount --make-rprivate /
mmdebstrap --quiet --variant=minbase --include=man-db,systemd \
  --aptopt='Acquire::Check-Valid-Until "false"' --aptopt='APT::Install-Recommends "false"' \
  bookworm "$root" \
  "deb http://deb.debian.org/debian bookworm main" \
  "deb http://deb.debian.org/debian-security bookworm-security main"
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp "$deb" "$root/tmp/weft.deb"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
in_root apt-get update -qq
echo "== dpkg -i"
in_root dpkg -i /tmp/weft.deb || echo "(dependencies missing, as expected in a minimal root)"
echo "== apt-get -f install"
in_root env DEBIAN_FRONTEND=noninteractive apt-get -f install -y -qq >/dev/null
echo "== status: $(in_root dpkg-query -W -f='${Status}' weft)"
echo "== version: $(in_root weftctl --version)"
echo "== agent version: $(in_root weft-agent --version)"
echo "== man: $(in_root man -w weftctl) $(in_root man -w weft-agent) $(in_root man -w weft-cni)"
echo "== verify"
in_root systemd-analyze verify /usr/lib/systemd/system/weft-agent.service 2>&1
echo "== enabled: $(ls "$root/etc/systemd/system/multi-user.target.wants" 2>/dev/null | grep -c weft || true)"
echo "== conffiles: $(in_root dpkg-query -W -f='${Conffiles}' weft | awk '{print $1}' | tr '\n' ' ')"
in_root dpkg-query -L weft > "$root/tmp/files"
echo "== purge"
in_root dpkg --purge weft
echo "== left:"
while read -r path; do
  [ -e "$root$path" ] || continue
  # A folder that stays because another package owns it too is Debian policy, not a leftover.
  if [ -d "$root$path" ] && in_root dpkg-query -S "$path" >/dev/null 2>&1; then continue; fi
  echo "$path"
done < "$root/tmp/files"
find "$root/etc" "$root/usr" "$root/var/lib/systemd" "$root/var/lib/dpkg/info" -name '*weft*' \
  | sed "s|^$root||"
echo "== end"
