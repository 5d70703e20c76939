#!/bin/busybox sh
# sohocloud initrd: load the few modules that reach the root fs, mount it, switch.
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

root="" ; mode=ro ; fstype=ext4 ; init=/sbin/init
for arg in $(cat /proc/cmdline); do
	case "$arg" in
		root=*) root="${arg#root=}" ;;
		rootfstype=*) fstype="${arg#rootfstype=}" ;;
		rw) mode=rw ;;
		init=*) init="${arg#init=}" ;;
	esac
done
[ -n "$root" ] || fail "no root= on the kernel command line"

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
mount --move /dev /root/dev
umount /proc /sys
exec switch_root /root "$init"
