// Every panel page loads this.
"use strict";
// Every page says which it is in the browser's console: the kiosk's Chromium logs it to the
// journal, which is how the PC's screen is known to show the panel (and which page).
(function () {
  const panel = document.getElementById("panel");
  console.info("sohocloud-panel: page shown: " + (panel ? panel.dataset.page : "unknown"));
})();

// On the desktop page, its heartbeat: tells the panel every few seconds that this tab is open, and
// whether the person used it since the last beat (the idle and disconnect timeouts). Signed out
// elsewhere (timeout, taken over, admin): back to the sign-in form.
(function () {
  const screen = document.getElementById("screen");
  if (!screen) return;
  let active = true;
  for (const kind of ["keydown", "pointerdown", "pointermove", "wheel"]) {
    document.addEventListener(kind, () => { active = true; }, { passive: true, capture: true });
  }
  async function beat() {
    const used = active;
    active = false;
    try {
      const r = await fetch("/alive", { method: "POST", headers: { "Content-Type": "application/json" },
                                        body: JSON.stringify({ active: used }), credentials: "same-origin" });
      if (r.status === 401) { window.location.replace("/"); }
    } catch (e) { /* the panel restarting: the next beat tells */ }
  }
  beat();
  setInterval(beat, 1000 * Number(screen.dataset.alive || 15));
})();
