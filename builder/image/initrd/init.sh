#!/bin/busybox sh
# sohocloud initrd: load the few modules that reach the root fs, mount it, switch.
# A disk node has root=UUID=... (ext4). A netboot node has sohocloud.squashfs=URL and its
# sohocloud.squashfs_sha256= (from boot.ipxe): DHCP on the NIC iPXE booted from, fetch the
# squashfs into RAM, refuse it unless its sha256 matches, run it under a tmpfs overlay, and
# fetch the node's NoCloud seed (ds=nocloud;s=URL) into /run for firstboot.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys

say() { echo "sohocloud-initrd: $*" > /dev/console; }
fail() {
	say "FATAL: $*"
	if grep -qw sohocloud.debug /proc/cmdline; then exec sh; fi
	say "powering off in 5 s (add sohocloud.debug to the kernel command line for a shell)"
	sleep 5
	poweroff -f
}

while read -r m; do
	[ -n "$m" ] && { insmod "/lib/modules/$m" 2>/dev/null || say "insmod $m failed"; }
done < /etc/modules-load

root="" ; mode=ro ; fstype=ext4 ; init=/sbin/init ; squashfs="" ; squashfs_sha="" ; bootif="" ; ds=""
for arg in $(cat /proc/cmdline); do
	case "$arg" in
		root=*) root="${arg#root=}" ;;
		rootfstype=*) fstype="${arg#rootfstype=}" ;;
		rw) mode=rw ;;
		init=*) init="${arg#init=}" ;;
		sohocloud.squashfs=*) squashfs="${arg#*=}" ;;
		sohocloud.squashfs_sha256=*) squashfs_sha="${arg#*=}" ;;
		BOOTIF=*) bootif="${arg#BOOTIF=}" ;;
		ds=*) ds="${arg#ds=}" ;;
	esac
done

# The NIC iPXE booted from (BOOTIF=01-aa-bb-..), else the first Ethernet one; drivers may
# still be probing, so wait for it (bounded).
boot_interface() {
	want=$(echo "${bootif#01-}" | tr 'A-F-' 'a-f:')
	tries=0
	while [ $tries -lt 100 ]; do
		for d in /sys/class/net/*; do
			[ "$(cat "$d/type" 2>/dev/null)" = 1 ] || continue
			if [ -z "$want" ] || [ "$(cat "$d/address")" = "$want" ]; then echo "${d##*/}"; return 0; fi
		done
		tries=$((tries + 1))
		sleep 0.1
	done
	return 1
}

# The seed named by ds=nocloud;s=URL (or nocloud-net;seedfrom=URL), into /run/sohocloud/netseed
# (0700: it carries the node's secrets). No seed for this MAC (404) leaves a not-enrolled note.
fetch_seed() {
	url=""
	case "$ds" in nocloud\;*|nocloud-net\;*) ;; *) return 0 ;; esac
	old_ifs=$IFS; IFS=';'
	for o in ${ds#*;}; do case "$o" in s=*|seedfrom=*) url="${o#*=}" ;; esac; done
	IFS=$old_ifs
	[ -n "$url" ] || return 0
	case "$url" in */) ;; *) url="$url/" ;; esac
	server=$(echo "$url" | sed -n 's#^\(https\{0,1\}://[^/]*\)/.*#\1#p')
	d=/run/sohocloud/netseed.tmp
	mkdir -p -m 0700 "$d"
	if ! wget -q -O "$d/meta-data" "${url}meta-data" 2> /run/sohocloud/wget.err; then
		if grep -q ' 404' /run/sohocloud/wget.err; then
			printf 'mac=%s\nserver=%s\n' "$1" "$server" > /run/sohocloud/not-enrolled
			say "netboot: $server has no seed for this machine ($1): not enrolled in the site"
		else
			say "netboot: seed not fetched from $server: $(cat /run/sohocloud/wget.err)"
		fi
		rm -rf "$d" /run/sohocloud/wget.err
		return 0
	fi
	for f in user-data network-config vendor-data; do
		wget -q -O "$d/$f" "${url}$f" 2>/dev/null || rm -f "$d/$f"
	done
	rm -f /run/sohocloud/wget.err
	mv "$d" /run/sohocloud/netseed
	say "netboot: seed fetched from $server"
}

netboot() {
	[ -n "$squashfs_sha" ] || fail "sohocloud.squashfs= without sohocloud.squashfs_sha256=: an unverified root is refused"
	iface=$(boot_interface) || fail "no network interface ${bootif:+with MAC $bootif }found"
	mac=$(cat "/sys/class/net/$iface/address")
	ip link set lo up
	ip link set "$iface" up
	say "netboot: DHCP on $iface ($mac)"
	udhcpc -i "$iface" -f -q -n -t 10 -T 3 -s /etc/udhcpc.script > /dev/null 2>&1 || fail "no DHCP answer on $iface"
	# /run (moved into the new root, where systemd keeps it) holds the squashfs, its mounts and the seed.
	mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
	mkdir -p /run/sohocloud/lower /run/sohocloud/rw
	img=/run/sohocloud/rootfs.squashfs
	say "netboot: fetching $squashfs"
	wget -q -O "$img" "$squashfs" || fail "cannot fetch $squashfs"
	got=$(sha256sum "$img" | cut -d' ' -f1)
	if [ "$got" != "$squashfs_sha" ]; then
		rm -f "$img"
		fail "$squashfs has sha256 $got, boot.ipxe expects $squashfs_sha: the root image is corrupt or was replaced; refusing to boot it"
	fi
	say "netboot: rootfs.squashfs verified (sha256 $got)"
	mount -t squashfs -o ro,loop "$img" /run/sohocloud/lower || fail "cannot mount the squashfs"
	# Everything written to / lives in this tmpfs: a reboot starts from the squashfs again.
	mount -t tmpfs -o mode=0755 tmpfs /run/sohocloud/rw
	mkdir /run/sohocloud/rw/upper /run/sohocloud/rw/work
	mount -t overlay overlay \
		-o lowerdir=/run/sohocloud/lower,upperdir=/run/sohocloud/rw/upper,workdir=/run/sohocloud/rw/work /root \
		|| fail "cannot mount the overlay root"
	fetch_seed "$mac"
	# The node's own network setup (firstboot, networkd, nftables) takes over from a down NIC:
	# no address before the firewall is loaded, and udev may rename it.
	ip addr flush dev "$iface"
	ip link set "$iface" down
	[ -x "/root$init" ] || [ -L "/root$init" ] || fail "$init not found in the squashfs"
	mount --move /run /root/run
}

disk() {
	[ -n "$root" ] || fail "no root= (disk) nor sohocloud.squashfs= (netboot) on the kernel command line"
	dev="" ; tries=0
	while [ -z "$dev" ]; do
		case "$root" in
			UUID=*|LABEL=*) dev=$(findfs "$root" 2>/dev/null) ;;
			/dev/*) [ -b "$root" ] && dev="$root" ;;
		esac
		[ -n "$dev" ] && break
		tries=$((tries + 1))
		[ $tries -gt 300 ] && fail "root device $root not found after 30 s"
		sleep 0.1
	done
	mount -t "$fstype" -o "$mode" "$dev" /root || fail "cannot mount $dev ($fstype) on /root"
	[ -x "/root$init" ] || [ -L "/root$init" ] || fail "$init not found on $dev"
}

if [ -n "$squashfs" ]; then netboot; else disk; fi
mount --move /dev /root/dev
umount /proc /sys
exec switch_root /root "$init"
