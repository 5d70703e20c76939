# An interactive shell left open is closed after 15 idle minutes (a forgotten root shell on a
# console or an SSH session is an open door). readonly: a user cannot lift it for the session.
TMOUT=900
readonly TMOUT
export TMOUT
