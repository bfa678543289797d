// promptcast OBS overlays (/overlay/poll, /overlay/now): a dependency-free ES module.
//
// Token-free and read-only: everything comes from the server-sent `state` events of /events.
// Query parameters: theme=dark|light, position=bottom|top, accent=%23rrggbb, scale=0.25..4,
// and for the poll winner_seconds (how long the winner stays up, default 20).
import { chosenBy } from "./chosen.js";

const params = new URLSearchParams(location.search);
const root = document.documentElement;
const kind = document.body.dataset.overlay;
const $ = (id) => document.getElementById(id);

root.dataset.theme = params.get("theme") === "light" ? "light" : "dark";
root.dataset.position = params.get("position") === "top" ? "top" : "bottom";
const accent = params.get("accent");
if (accent && /^#[0-9a-f]{3,8}$/i.test(accent)) root.style.setProperty("--accent", accent);
const scale = Number.parseFloat(params.get("scale"));
if (Number.isFinite(scale)) root.style.setProperty("--scale", String(Math.min(4, Math.max(0.25, scale))));
const winnerSeconds = Number.parseFloat(params.get("winner_seconds") ?? "20");

let clockOffset = 0; // server clock minus this browser's, in seconds
let state = null;
const closedSeenAt = new Map(); // round id -> when this page first saw it closed (ms)

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // never HTML: prompts come from chat
  return node;
}

// --- the vote -----------------------------------------------------------------------------------

function renderPoll() {
  const card = $("poll");
  const round = state && state.round;
  if (!round || !round.options.length) {
    card.hidden = true;
    return;
  }
  if (round.closed && !closedSeenAt.has(round.id)) closedSeenAt.set(round.id, Date.now());
  const closedFor = round.closed ? (Date.now() - closedSeenAt.get(round.id)) / 1000 : 0;
  if (round.closed && (!round.winner || closedFor > winnerSeconds)) {
    card.hidden = true; // no winner (the options go back to the pool), or shown long enough
    return;
  }
  card.hidden = false;
  card.classList.toggle("closed", round.closed);
  const count = round.options.length;
  $("hint").textContent = `type ${state.vote_command || "!vote"} ${count > 1 ? `1–${count}` : "1"} in chat`;
  const list = $("options");
  if (list.dataset.round !== round.id || list.children.length !== count) {
    list.dataset.round = round.id;
    list.replaceChildren(
      ...round.options.map((option) => {
        const item = el("li", "option");
        item.dataset.n = String(option.n);
        const bar = el("div", "bar");
        bar.append(el("div", "fill"));
        item.append(el("span", "n", String(option.n)), el("span", "text"), el("span", "votes"), bar);
        return item;
      }),
    );
  }
  const total = round.total_votes || 0;
  const best = Math.max(0, ...round.options.map((o) => (o.vetoed ? 0 : o.votes)));
  round.options.forEach((option, index) => {
    const item = list.children[index];
    item.querySelector(".text").textContent = option.text;
    item.querySelector(".votes").textContent = String(option.votes);
    item.querySelector(".fill").style.width = `${total ? ((100 * option.votes) / total).toFixed(1) : 0}%`;
    item.classList.toggle("vetoed", Boolean(option.vetoed));
    item.classList.toggle("leading", !round.closed && best > 0 && option.votes === best && !option.vetoed);
    item.classList.toggle("won", Boolean(round.winner && round.winner.n === option.n));
  });
  const winner = $("winner");
  winner.hidden = !round.winner;
  if (round.winner) {
    $("winner-text").textContent = round.winner.text;
    $("winner-by").textContent = `chosen by @${round.winner.by}`;
  }
  tickCountdown();
}

function tickCountdown() {
  const round = state && state.round;
  const countdown = $("countdown");
  if (!countdown || !round) return;
  if (round.closed) {
    countdown.textContent = "closed";
    countdown.classList.remove("ending");
    if (closedSeenAt.has(round.id) && (Date.now() - closedSeenAt.get(round.id)) / 1000 > winnerSeconds) {
      renderPoll();
    }
    return;
  }
  const left = Math.max(0, round.closes_at - (Date.now() / 1000 + clockOffset));
  countdown.textContent = `${Math.floor(left / 60)}:${String(Math.floor(left % 60)).padStart(2, "0")}`;
  countdown.classList.toggle("ending", left < 5);
}

// --- now playing --------------------------------------------------------------------------------

function renderNow() {
  const now = state && state.now_playing;
  $("now").hidden = !now;
  if (!now) return;
  $("now-text").textContent = now.text;
  $("now-by").textContent = chosenBy(now.chosen_by);
}

// --- the event stream ---------------------------------------------------------------------------

function connect() {
  const source = new EventSource("/events");
  source.addEventListener("state", (event) => {
    state = JSON.parse(event.data);
    if (typeof state.server_time === "number") clockOffset = state.server_time - Date.now() / 1000;
    if (kind === "poll") renderPoll();
    else renderNow();
  });
  source.addEventListener("error", () => {
    // The last state stays on screen; the browser reconnects by itself unless it gave up.
    if (source.readyState === EventSource.CLOSED) setTimeout(connect, 3000);
  });
}

connect();
if (kind === "poll") setInterval(tickCountdown, 250);
