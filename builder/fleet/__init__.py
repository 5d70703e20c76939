"""The site runtime: a site file becomes secrets, images, seeds and a record of them (`fleet build`),
then an office booted on a private LAN (`fleet up`), checked across nodes (`fleet test`), stopped
(`fleet down`). sitefile (the site file), secrets, seeds (each node's seed), build, record (what a
build made), pxe (the PXE volume), netlab (the namespace LAN), up, running (state, down, ssh), checks."""
