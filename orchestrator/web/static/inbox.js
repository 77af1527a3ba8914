// scopegraph approvals: passkeys (WebAuthn), answers, countdowns and live updates.
// Served from this origin; the Content-Security-Policy allows no inline script.
"use strict";

const b64 = {
  toBuf(text) {
    const s = text.replace(/-/g, "+").replace(/_/g, "/");
    const raw = atob(s + "===".slice((s.length + 3) % 4));
    return Uint8Array.from(raw, (c) => c.charCodeAt(0)).buffer;
  },
  fromBuf(buf) {
    let s = "";
    for (const b of new Uint8Array(buf)) s += String.fromCharCode(b);
    return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  },
};

function say(text, bad) {
  const el = document.getElementById("status");
  if (!el) return;
  el.textContent = text;
  el.classList.toggle("bad", Boolean(bad));
}

async function post(url, body) {
  const headers = { "Content-Type": "application/json" };
  const csrf = document.body.dataset.csrf;
  if (csrf) headers["X-CSRF-Token"] = csrf;
  const res = await fetch(url, { method: "POST", headers, body: JSON.stringify(body || {}), credentials: "same-origin" });
  let data = {};
  try { data = await res.json(); } catch (e) { data = { error: "unexpected answer (" + res.status + ")" }; }
  if (!res.ok) throw new Error(data.error || ("refused (" + res.status + ")"));
  return data;
}

function creationOptions(o) {
  return {
    ...o,
    challenge: b64.toBuf(o.challenge),
    user: { ...o.user, id: b64.toBuf(o.user.id) },
    excludeCredentials: (o.excludeCredentials || []).map((c) => ({ ...c, id: b64.toBuf(c.id) })),
  };
}

function requestOptions(o) {
  return {
    ...o,
    challenge: b64.toBuf(o.challenge),
    allowCredentials: (o.allowCredentials || []).map((c) => ({ ...c, id: b64.toBuf(c.id) })),
  };
}

function assertionJSON(cred) {
  const r = cred.response;
  return {
    id: cred.id, rawId: b64.fromBuf(cred.rawId), type: cred.type,
    response: {
      authenticatorData: b64.fromBuf(r.authenticatorData),
      clientDataJSON: b64.fromBuf(r.clientDataJSON),
      signature: b64.fromBuf(r.signature),
      userHandle: r.userHandle ? b64.fromBuf(r.userHandle) : null,
    },
  };
}

function attestationJSON(cred) {
  const r = cred.response;
  return {
    id: cred.id, rawId: b64.fromBuf(cred.rawId), type: cred.type,
    response: {
      attestationObject: b64.fromBuf(r.attestationObject),
      clientDataJSON: b64.fromBuf(r.clientDataJSON),
      transports: r.getTransports ? r.getTransports() : [],
    },
    clientExtensionResults: {},
  };
}

// pages -----------------------------------------------------------------------------------
function loginPage() {
  const button = document.getElementById("login");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      say("Waiting for your passkey…");
      const begun = await post("/auth/login/begin", {});
      const cred = await navigator.credentials.get({ publicKey: requestOptions(begun.options) });
      const done = await post("/auth/login/finish", { challenge_id: begun.challenge_id, credential: assertionJSON(cred) });
      location.assign(done.next);
    } catch (e) {
      say(e.message, true);
      button.disabled = false;
    }
  });
}

async function enrolPage() {
  const token = location.hash.slice(1);
  const button = document.getElementById("enrol");
  const invitee = document.getElementById("invitee");
  if (!token) { invitee.textContent = "This link holds no invitation."; return; }
  let begun;
  try {
    begun = await post("/auth/enrol/begin", { token });
  } catch (e) {
    invitee.textContent = e.message;
    invitee.classList.add("bad");
    return;
  }
  invitee.textContent = "Invitation for " + begun.name + ".";
  button.disabled = false;
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      say("Creating your passkey…");
      const cred = await navigator.credentials.create({ publicKey: creationOptions(begun.options) });
      const done = await post("/auth/enrol/finish", { token, challenge_id: begun.challenge_id, credential: attestationJSON(cred) });
      history.replaceState(null, "", "/enrol");  // the spent token leaves the address bar
      location.assign(done.next);
    } catch (e) {
      say(e.message, true);
    }
  });
}

function requestPage() {
  const box = document.getElementById("answer");
  if (!box) return;
  const id = box.dataset.approval;
  const answer = async (decision) => {
    const reason = document.getElementById("reason").value;
    const proposeText = (document.getElementById("propose") || { value: "" }).value.trim();
    const body = { decision, reason };
    if (decision === "deny" && proposeText) {
      try { body.propose = JSON.parse(proposeText); } catch (e) { say("The proposal is not valid JSON.", true); return; }
    }
    for (const b of box.querySelectorAll("button")) b.disabled = true;
    try {
      say("Confirm with your passkey: it signs this exact call…");
      const begun = await post("/api/approvals/" + id + "/answer/begin", body);
      const cred = await navigator.credentials.get({ publicKey: requestOptions(begun.options) });
      await post("/api/approvals/" + id + "/answer/finish", { ...body, nonce: begun.nonce, credential: assertionJSON(cred) });
      location.reload();
    } catch (e) {
      say(e.message, true);
      for (const b of box.querySelectorAll("button")) b.disabled = false;
    }
  };
  document.getElementById("approve").addEventListener("click", () => answer("approve"));
  document.getElementById("deny").addEventListener("click", () => answer("deny"));
}

// countdowns ------------------------------------------------------------------------------
function words(seconds) {
  if (seconds <= 0) return "expired";
  if (seconds < 60) return "in " + seconds + "s";
  if (seconds < 3600) return "in " + Math.floor(seconds / 60) + "m " + (seconds % 60) + "s";
  return "in " + Math.floor(seconds / 3600) + "h";
}

function countdowns() {
  const els = Array.from(document.querySelectorAll(".countdown"));
  if (!els.length) return;
  const started = Date.now();
  const tick = () => {
    const gone = Math.floor((Date.now() - started) / 1000);
    for (const el of els) {
      const left = Number(el.dataset.remaining) - gone;
      el.textContent = words(left);
      el.classList.toggle("expired", left <= 0);
    }
  };
  tick();
  setInterval(tick, 1000);
}

// live updates (server-sent events) -------------------------------------------------------
function live() {
  if (!document.body.dataset.csrf || !window.EventSource) return;
  const page = document.body.dataset.page;
  if (page !== "inbox" && page !== "request" && page !== "history") return;
  // From the moment the page was rendered (a reconnect sends Last-Event-ID, which wins).
  const since = document.body.dataset.since;
  const source = new EventSource("/api/events" + (since ? "?since=" + encodeURIComponent(since) : ""));
  source.addEventListener("open", () => { document.body.dataset.live = "open"; });
  const note = document.getElementById("live");
  const onEvent = (ev) => {
    let data = {};
    try { data = JSON.parse(ev.data); } catch (e) { return; }
    const box = document.getElementById("answer");
    const typing = box && document.activeElement && box.contains(document.activeElement);
    if (page === "request" && box && data.approval_id !== box.dataset.approval) return;
    if (typing) {
      note.textContent = "This request changed: " + ev.type + ". Reload to see it.";
      note.hidden = false;
      return;
    }
    location.reload();
  };
  for (const kind of ["request.created", "request.answered", "request.expired"]) source.addEventListener(kind, onEvent);
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "login") loginPage();
  if (page === "enrol") enrolPage();
  if (page === "request") requestPage();
  countdowns();
  live();
});
