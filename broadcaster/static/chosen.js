// Who chose a prompt, in words: one phrasing for the panel, the overlays and the docs.
// The stored label (`chosen_by`) stays as steering writes it ("panel", "@alice (vote)", ...).

export const STREAMER = "the streamer";

export function chooser(who) {
  if (!who) return "";
  const vote = /^(@\S+) \(vote\)$/.exec(who);
  if (vote) return `${vote[1]} · won the vote`;
  if (who === "panel" || who === "api") return STREAMER;
  if (who === "start") return "the channel (start prompt)";
  if (who.startsWith("schedule:")) return `the programme (${who.slice("schedule:".length)})`;
  return who.replace(/\(approved by panel\)$/, `(approved by ${STREAMER})`);
}

export function chosenBy(who) {
  return who ? `chosen by ${chooser(who)}` : "";
}
