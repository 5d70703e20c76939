// The desktop in the page: noVNC over this panel's own origin (wss://<this panel>/vnc). The
// WebSocket carries the browser session's cookie, which is all it takes: no token in the page.
import RFB from "/novnc/core/rfb.js";

const screen = document.getElementById("screen");
const rfb = new RFB(screen, `wss://${window.location.host}/vnc`);
rfb.scaleViewport = true;
rfb.focusOnClick = true;
rfb.addEventListener("connect", () => { screen.dataset.state = "connected"; rfb.focus(); });
rfb.addEventListener("disconnect", (e) => {
  screen.dataset.state = e.detail.clean ? "disconnected" : "failed";
  // The session may still be starting (its VNC socket not there yet): try again shortly; a
  // session that ended sends the heartbeat to the sign-in page.
  setTimeout(() => window.location.reload(), 3000);
});
