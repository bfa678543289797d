// promptcast control panel: a dependency-free ES module (no build step).
//
// Reads: GET /events (server-sent `state` events, token-free), GET /healthz every 2 s,
// GET /api/state (the pool, with the token). Acts: POST /api/{prompt,skip,veto,pause,resume,
// approve,ban} with `Authorization: Bearer <token>`; the token is asked for once and kept in
// localStorage. Preview: WHEP (POST /whep with an SDP offer) into the <video>.
// Query: ?view=preview (the preview alone, no token asked), ?preview=off, ?audio=off (preview view).

const TOKEN_KEY = "promptcast.apiToken";
const HEALTH_EVERY_MS = 2000;
const STATE_EVERY_MS = 5000;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const previewOnly = params.get("view") === "preview";

let token = readToken();
let clockOffset = 0; // server clock minus this browser's, in seconds
let lastEvent = null; // the newest /events state
let poolRev = null;
let mode = null;

// --- small helpers ------------------------------------------------------------------------------

function readToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

function saveToken(value) {
  try {
    if (value) localStorage.setItem(TOKEN_KEY, value);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    /* private mode: the token lives until the page closes */
  }
}

/** Create an element; text children become text nodes (never HTML: prompts come from chat). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "className") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function setPill(id, text, kind = "") {
  const pill = $(id);
  pill.textContent = text;
  pill.className = `pill ${kind}`;
}

export function notify(text, kind = "info") {
  const box = $("messages");
  const message = el("div", { className: `message ${kind}` }, text);
  box.append(message);
  while (box.children.length > 5) box.firstElementChild.remove();
  setTimeout(() => message.remove(), kind === "error" ? 12000 : 5000);
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Call the control API; 401 asks for the token again, other errors carry the server's reason. */
async function api(path, { method = "GET", body } = {}) {
  if (!token) {
    askToken();
    throw new ApiError(401, "the API token is needed");
  }
  const headers = { Authorization: `Bearer ${token}` };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, "the server cannot be reached");
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    /* not JSON */
  }
  if (response.status === 401) {
    askToken("The server refused the token; enter it again.");
    throw new ApiError(401, "wrong or missing token");
  }
  if (!response.ok) {
    let reason = (data && data.error) || `HTTP ${response.status}`;
    const retry = response.headers.get("Retry-After");
    if (response.status === 429 && retry) reason += ` (retry in ${retry} s)`;
    throw new ApiError(response.status, reason);
  }
  return data;
}

/** A moderator action: POST, then say how it went (`what` names it in an error). */
async function act(done, path, body, what = path.replace("/api/", "")) {
  try {
    const result = await api(path, { method: "POST", body });
    notify(done);
    return result;
  } catch (error) {
    if (error.status !== 401) notify(`${what} failed: ${error.message}`, "error");
    return null;
  }
}

// --- the token ----------------------------------------------------------------------------------

function askToken(message = "") {
  if (previewOnly) return;
  const dialog = $("token-dialog");
  const error = $("token-error");
  error.textContent = message;
  error.hidden = !message;
  if (!dialog.open) {
    $("token-input").value = "";
    dialog.showModal();
  }
  $("token-input").focus();
}

async function submitToken(event) {
  event.preventDefault();
  const candidate = $("token-input").value.trim();
  if (!candidate) return;
  token = candidate;
  $("token-submit").disabled = true;
  try {
    await refreshState();
    saveToken(candidate);
    $("token-dialog").close();
    notify("token accepted");
  } catch (error) {
    if (error.status === 401) {
      token = "";
      askToken("Wrong token.");
    } else {
      askToken(`Cannot check the token: ${error.message}`);
    }
  } finally {
    $("token-submit").disabled = false;
  }
}

function forgetToken() {
  token = "";
  saveToken("");
  askToken();
}

// --- state: the event stream and /api/state -----------------------------------------------------

function connectEvents() {
  const source = new EventSource("/events");
  source.addEventListener("open", () => setPill("live", "live", "ok"));
  source.addEventListener("state", (event) => {
    const state = JSON.parse(event.data);
    if (typeof state.server_time === "number") clockOffset = state.server_time - Date.now() / 1000;
    render(state);
  });
  source.addEventListener("error", () => {
    setPill("live", "reconnecting…", "warn");
    if (source.readyState === EventSource.CLOSED) {
      setTimeout(connectEvents, 3000); // the browser gave up (e.g. a 503): start over
    }
  });
}

let stateInFlight = null;

/** GET /api/state: the pool (not on the token-free stream) and the mode. */
function refreshState() {
  if (!stateInFlight) {
    stateInFlight = api("/api/state")
      .then((full) => {
        const steering = full.steering || {};
        mode = steering.mode || mode;
        renderPool(steering.pool || []);
        $("channel").textContent = full.channel || "";
        return full;
      })
      .finally(() => {
        stateInFlight = null;
      });
  }
  return stateInFlight;
}

function quietRefresh() {
  if (!token) return;
  refreshState().catch((error) => {
    if (error.status !== 401) setPill("live", `API: ${error.message}`, "bad");
  });
}

function render(state) {
  lastEvent = state;
  mode = state.mode || mode;
  $("channel").textContent = state.channel || "";
  const now = state.now_playing;
  $("now-text").textContent = now ? now.text : "—";
  $("now-by").textContent = now ? now.chosen_by || "the channel (start prompt)" : "—";
  $("paused-badge").hidden = !state.paused;
  $("btn-pause").disabled = Boolean(state.paused);
  $("btn-resume").disabled = !state.paused;
  renderRound(state.round);
  renderQueue(state.queue || []);
  $("pool-count").textContent = state.pool_size ? String(state.pool_size) : "";
  if (state.pool_rev !== poolRev) {
    poolRev = state.pool_rev;
    quietRefresh();
  }
}

function renderRound(round) {
  const list = $("round-options");
  $("round-empty").hidden = Boolean(round);
  const winner = $("round-winner");
  if (!round) {
    list.replaceChildren();
    winner.hidden = true;
    tickCountdown();
    return;
  }
  const total = round.total_votes || 0;
  list.replaceChildren(
    ...round.options.map((option) => {
      const share = total ? (100 * option.votes) / total : 0;
      const fill = el("div", { className: "fill" });
      fill.style.width = `${share.toFixed(1)}%`;
      const veto = round.closed || option.vetoed
        ? null
        : el("button", {
          type: "button", className: "small ghost", title: `option ${option.n} cannot win`,
          onclick: () => act(`option ${option.n} vetoed`, "/api/veto", { option: option.n }),
        }, "Veto");
      return el(
        "li",
        { className: `option${option.vetoed ? " vetoed" : ""}`, dataset: { n: String(option.n) } },
        el("span", { className: "n" }, String(option.n)),
        el("span", { className: "text" }, option.text),
        el("span", { className: "votes" }, String(option.votes)),
        veto || el("span"),
        el("span", { className: "by" }, `@${option.by}`),
        el("div", { className: "bar" }, fill),
      );
    }),
  );
  if (round.closed) {
    winner.hidden = false;
    winner.textContent = round.winner
      ? `Winner: ${round.winner.text} — chosen by @${round.winner.by}`
      : "No winner: too few votes; the options go back to the pool.";
  } else {
    winner.hidden = true;
  }
  tickCountdown();
}

function tickCountdown() {
  const badge = $("countdown");
  const round = lastEvent && lastEvent.round;
  if (!round) {
    badge.textContent = "";
    return;
  }
  if (round.closed) {
    badge.textContent = "closed";
    badge.className = "badge";
    return;
  }
  const left = Math.max(0, round.closes_at - (Date.now() / 1000 + clockOffset));
  badge.textContent = `${Math.floor(left / 60)}:${String(Math.floor(left % 60)).padStart(2, "0")}`;
  badge.className = `badge ${left < 5 ? "warn" : "ok"}`;
}

function renderQueue(queue) {
  $("queue-count").textContent = queue.length ? String(queue.length) : "";
  $("queue-empty").hidden = queue.length > 0;
  $("queue").replaceChildren(
    ...queue.map((item) =>
      el("li", {}, el("span", { className: "what" }, item.text), el("span", { className: "by" }, item.chosen_by || ""))
    ),
  );
}

function renderPool(pool) {
  $("pool-empty").hidden = pool.length > 0;
  $("pool").replaceChildren(
    ...pool.map((entry) => {
      const buttons = el("span", { className: "buttons" });
      if (mode === "manual") {
        buttons.append(el("button", {
          type: "button", className: "small", dataset: { approve: entry.id },
          onclick: () => act(`approved: ${entry.text}`, "/api/approve", { id: entry.id }).then(quietRefresh),
        }, "Approve"));
      }
      buttons.append(el("button", {
        type: "button", className: "small danger",
        onclick: () => act(`banned: ${entry.text}`, "/api/ban", { text: entry.text }).then(quietRefresh),
      }, "Ban"));
      return el(
        "li",
        { dataset: { id: entry.id } },
        el("span", {}, el("span", { className: "what" }, entry.text), " ", el("span", { className: "by" }, `@${entry.by}`)),
        buttons,
      );
    }),
  );
}

// --- health: engine and outputs -----------------------------------------------------------------

async function pollHealth() {
  try {
    const response = await fetch("/healthz", { cache: "no-store" });
    renderHealth(await response.json());
  } catch {
    setPill("health", "server unreachable", "bad");
  } finally {
    setTimeout(pollHealth, HEALTH_EVERY_MS);
  }
}

function renderHealth(health) {
  const ok = health.status === "ok";
  setPill("health", ok ? "healthy" : "failing", ok ? "ok" : "bad");
  const engine = health.engine || {};
  const pacer = health.pacer || {};
  const rows = [
    ["backend", engine.backend],
    // "loading: loading weights 7.2 / 14.1 GB (...)", "warmup: making the first block (12s)", "running"
    ["state", engine.phase && engine.phase !== engine.state ? `${engine.state}: ${engine.phase}` : engine.state],
    ["generation", engine.generation_fps !== undefined ? `${engine.generation_fps} fps` : undefined],
    ["output clock", pacer.fps !== undefined ? `${pacer.fps} fps, ${pacer.frames_repeated ?? 0} repeated` : undefined],
    ["restarts", engine.restarts],
    ["WHEP viewers", health.whep && health.whep.max_viewers !== undefined
      ? `${health.whep.viewers}/${health.whep.max_viewers}` : undefined],
    ["block", engine.block],
    ["last error", engine.last_error || "none"],
  ];
  $("engine").replaceChildren(
    ...rows.filter(([, v]) => v !== undefined && v !== null).flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]),
  );
  const outputs = Object.entries(health.outputs || {});
  $("outputs").tBodies[0].replaceChildren(
    ...outputs.map(([name, o]) => {
      const connected = el("span", { className: `badge ${o.connected ? "ok" : "bad"}` }, o.connected ? "yes" : "no");
      return el(
        "tr",
        { dataset: { output: name } },
        el("td", {}, name),
        el("td", {}, o.kind || ""),
        el("td", {}, connected),
        el("td", {}, o.bitrate_kbps !== undefined ? `${o.bitrate_kbps} kbit/s` : "—"),
        el("td", {}, String(o.reconnects ?? "—")),
        el("td", { className: "small muted" }, o.last_error || ""),
      );
    }),
  );
}

// --- preview: WHEP ------------------------------------------------------------------------------

const preview = { pc: null, session: null, retry: null, attempts: 0 };

function previewStatus(text) {
  $("preview-status").textContent = text;
}

function iceGathered(pc, ms) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") {
        clearTimeout(timer);
        resolve();
      }
    });
  });
}

function stopPreview() {
  clearTimeout(preview.retry);
  if (preview.session) {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    fetch(preview.session, { method: "DELETE", headers, keepalive: true }).catch(() => {});
    preview.session = null;
  }
  if (preview.pc) {
    preview.pc.close();
    preview.pc = null;
  }
}

function retryPreview() {
  clearTimeout(preview.retry);
  preview.attempts += 1;
  preview.retry = setTimeout(startPreview, Math.min(30000, 1000 * 2 ** Math.min(preview.attempts, 5)));
}

async function startPreview() {
  stopPreview();
  if (params.get("preview") === "off") {
    previewStatus("preview off");
    return;
  }
  if (typeof RTCPeerConnection === "undefined") {
    previewStatus("preview unavailable: this browser has no WebRTC");
    return;
  }
  previewStatus("preview connecting…");
  const pc = new RTCPeerConnection();
  preview.pc = pc;
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  pc.addEventListener("track", (event) => {
    const video = $("preview-video");
    const stream = event.streams[0] || new MediaStream([event.track]);
    if (video.srcObject === stream) return;
    video.srcObject = stream;
    if (previewOnly && params.get("audio") !== "off") {
      // OBS's browser may play sound by itself; a normal tab refuses until clicked: stay muted there.
      video.muted = false;
      video.play().catch(() => {
        video.muted = true;
        video.play().catch(() => {});
      });
    }
  });
  pc.addEventListener("connectionstatechange", () => {
    if (pc !== preview.pc) return;
    const state = pc.connectionState;
    if (state === "connected") {
      previewStatus("");
      preview.attempts = 0;
    } else if (state === "failed" || state === "disconnected") {
      previewStatus(`preview ${state}; reconnecting…`);
      retryPreview();
    }
  });
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc, 2000);
    const headers = { "Content-Type": "application/sdp" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch("/whep", { method: "POST", headers, body: pc.localDescription.sdp });
    if (pc !== preview.pc) return;
    if ([404, 405, 501].includes(response.status)) {
      stopPreview();
      previewStatus("preview unavailable: this server has no WHEP endpoint");
      return;
    }
    if (response.status === 401 || response.status === 403) {
      stopPreview();
      previewStatus("preview unavailable: the token was refused");
      return;
    }
    if (!response.ok) throw new Error(`WHEP answered HTTP ${response.status}`);
    const where = response.headers.get("Location");
    preview.session = where ? new URL(where, location.href).href : null;
    await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
    previewStatus("preview connecting…");
  } catch (error) {
    if (pc !== preview.pc) return;
    previewStatus(`preview unavailable: ${error.message}; retrying…`);
    retryPreview();
  }
}

// --- wiring -------------------------------------------------------------------------------------

function wire() {
  $("token-form").addEventListener("submit", submitToken);
  $("forget-token").addEventListener("click", forgetToken);
  $("preview-retry").addEventListener("click", () => {
    preview.attempts = 0;
    startPreview();
  });
  $("prompt-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = $("prompt-input");
    const prompt = input.value.trim();
    if (!prompt) return;
    $("prompt-send").disabled = true;
    const result = await act(`queued: ${prompt} (plays at the next block)`, "/api/prompt", { prompt });
    $("prompt-send").disabled = false;
    if (result) input.value = "";
  });
  $("ban-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = $("ban-input");
    const text = input.value.trim();
    if (text && (await act(`banned: ${text}`, "/api/ban", { text }))) {
      input.value = "";
      quietRefresh();
    }
  });
  const labels = { skip: "skipped", veto: "next queued prompt vetoed", pause: "paused", resume: "resumed" };
  for (const button of document.querySelectorAll("#actions [data-action]")) {
    const action = button.dataset.action;
    button.addEventListener("click", () => act(labels[action], `/api/${action}`));
  }
  window.addEventListener("pagehide", stopPreview);
}

function main() {
  if (previewOnly) {
    document.body.classList.add("preview-only");
    startPreview();
    return;
  }
  wire();
  connectEvents();
  pollHealth();
  startPreview();
  setInterval(tickCountdown, 250);
  setInterval(quietRefresh, STATE_EVERY_MS);
  if (token) quietRefresh();
  else askToken();
}

main();
