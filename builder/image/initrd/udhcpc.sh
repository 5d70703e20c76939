#!/bin/sh
# sohocloud initrd: busybox udhcpc's lease script (netboot). $mask is the prefix length.
case "$1" in
	bound|renew)
		ip addr flush dev "$interface"
		ip addr add "$ip/${mask:-24}" dev "$interface"
		[ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
		;;
esac
exit 0
