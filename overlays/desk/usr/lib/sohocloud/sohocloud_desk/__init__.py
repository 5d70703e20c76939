"""sohocloud_desk: desktops on demand for the office's people.

The broker (on the node that provides `desktops`, the control node) checks who signs in, decides
which workstation host runs their session and keeps the one-session-per-person rule; the panel
on every workstation host serves the sign-in page, runs the session containers and shows the
desktop (noVNC) over its own HTTPS origin. Stdlib only, beside the firstboot package.
"""
