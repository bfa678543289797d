"""Prompt moderation: what a viewer's suggestion must pass before it reaches the pool.

`Moderator.check` runs one message through the pipeline (documented in
docs/moderation.md) and returns a `Decision` whose `reason` is one of `REASONS`; the
refusal reasons are the label values of `promptcast_prompts_rejected_total{reason}`.
It never raises on any text.

Matching (blocklist, banned prompts, duplicates) works on a *folded* form of the
cleaned text: casefolded, accents removed, common Cyrillic/Greek/small-capital
lookalikes and leetspeak mapped to ASCII letters, split into words at every
non-alphanumeric character. A blocklist entry matches a run of whole words with the
separators removed, so "bad" matches "b a d", "b.a.d" and "B4D" but not "badminton".
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from chat.events import ChatEvent, Role
from chat.settings import ModerationSettings

__all__ = [
    "REASONS",
    "REJECT_REASONS",
    "Decision",
    "Folded",
    "Moderator",
    "clean_text",
    "fold",
]

REJECT_REASONS: tuple[str, ...] = (
    "user_denied", "flood", "too_long", "empty", "too_short", "blocked", "banned", "automod",
    "duplicate", "rate_limited", "mention",
)
REASONS: frozenset[str] = frozenset(("accepted", *REJECT_REASONS))

RATE_WINDOW_SECONDS = 60.0
RAW_LENGTH_FACTOR = 4  # raw text longer than this times max_chars is too_long before any cleaning
MAX_MARKS = 3  # combining marks kept in a row (more is "Zalgo" text)


@dataclass(frozen=True)
class Decision:
    """The verdict on one suggestion."""

    accepted: bool
    reason: str  # "accepted" or one of REJECT_REASONS
    text: str = ""  # the prompt to play (template applied); empty when refused
    raw: str = ""  # the cleaned viewer text, no template; empty when refused before cleaning
    message: str = ""  # a short human explanation, fit for a chat reply
    retry_after: float = 0.0  # rate_limited / flood: seconds until the user may try again


# -- cleaning ---------------------------------------------------------------------------------------

# Invisible characters that are not format (Cf) characters: fillers and blanks people use to
# make text look empty or to split words. Cf (zero-width, bidi controls, soft hyphen, word joiner,
# BOM, tag characters, ...) is removed by category. U+E0000 is unassigned, but chat clients append
# it to get around Twitch's duplicate-message filter.
_INVISIBLE = frozenset(
    "\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180e\u180f\u2800\u3164\uffa0\U000e0000"
)
_ASCII_DROP = {c: None for c in (*range(0x00, 0x09), 0x0E, 0x0F, *range(0x10, 0x1C), 0x7F)}
_RLO, _PDF, _PDI = "\u202e", "\u202c", "\u2069"


def _strip_invisible(text: str) -> str:
    """Drop control (except whitespace), format, surrogate, private-use and blank characters; cap marks."""
    if text.isascii():
        return text if text.isprintable() else text.translate(_ASCII_DROP)
    out: list[str] = []
    marks = 0
    for ch in text:
        if ch in _INVISIBLE:
            continue
        cat = unicodedata.category(ch)
        if cat[0] == "C" and cat != "Cn":
            if cat == "Cc" and ch.isspace():
                out.append(" ")
                marks = 0
            continue
        if cat in ("Mn", "Me"):
            marks += 1
            if marks > MAX_MARKS:
                continue
        else:
            marks = 0
        out.append(ch)
    return "".join(out)


def _mention_pattern(logins: Iterable[str]) -> re.Pattern[str] | None:
    """`@login` for any of `logins` (as a whole name, any case), or None without logins."""
    names = sorted({login.casefold().lstrip("@") for login in logins if login}, key=len, reverse=True)
    if not names:
        return None
    return re.compile(r"@(?:" + "|".join(map(re.escape, names)) + r")(?![\w])", re.IGNORECASE)


def clean_text(text: str) -> str:
    """NFKC, invisible and control characters removed, whitespace collapsed (linear time).

    Idempotent: cleaning a cleaned text changes nothing.
    """
    text = unicodedata.normalize("NFKC", text)
    for _ in range(4):  # removing characters can leave new compositions; this settles at once
        stripped = _strip_invisible(text)
        if stripped == text:
            break
        text = unicodedata.normalize("NFKC", stripped)
    return " ".join(text.split())


def _visual(text: str) -> str | None:
    """The text as displayed when it uses right-to-left overrides (U+202E), or None without one.

    An override displays the following characters reversed until a U+202C/U+2069 or the end
    of the line, so "\u202edab" shows as "bad". Nesting is ignored (an approximation).
    """
    if _RLO not in text:
        return None
    out: list[str] = []
    for line in text.splitlines() or [""]:
        head, *segments = line.split(_RLO)
        out.append(head)
        for segment in segments:
            end = min((i for i in (segment.find(_PDF), segment.find(_PDI)) if i >= 0), default=len(segment))
            out.append(segment[:end][::-1] + segment[end:])
        out.append("\n")
    return "".join(out)


# -- folding ----------------------------------------------------------------------------------------

_LOOKALIKES = {
    "a": "\u0430\u03b1\u0251\u1d00\u237a",
    "b": "\u044c\u0432\u03b2\u0299\u0185",
    "c": "\u0441\u03f2\u1d04",
    "d": "\u0501\u1d05",
    "e": "\u0435\u03b5\u0454\u1d07\u04bd\u025b",
    "f": "\ua730",
    "g": "\u0261\u0262\u0581",
    "h": "\u04bb\u043d\u029c",
    "i": "\u0456\u03b9\u0131\u04cf\u026a",
    "j": "\u0458\u1d0a\u03f3",
    "k": "\u043a\u03ba\u1d0b",
    "l": "\u029f",
    "m": "\u043c\u1d0d",
    "n": "\u043f\u03b7\u0274\u0578",
    "o": "\u043e\u03bf\u03c3\u1d0f\u04e9\u0585",
    "p": "\u0440\u03c1\u1d18",
    "q": "\u051b",
    "r": "\u0433\u0280",
    "s": "\u0455\ua731",
    "t": "\u0442\u03c4\u1d1b",
    "u": "\u03c5\u1d1c\u057d\u03bc",
    "v": "\u03bd\u0475\u1d20",
    "w": "\u051d\u03c9\u1d21\u0448",
    "x": "\u0445\u03c7\u00d7",
    "y": "\u0443\u03b3\u04af\u028f",
    "z": "\u1d22",
}
_LETTER_BLOCKS = (0x1F1E6, 0x1F170, 0x1F150)  # regional indicators, negative squared/circled A-Z
_CONFUSABLE_TABLE: dict[int, str] = {ord(ch): latin for latin, chars in _LOOKALIKES.items() for ch in chars}
for _start in _LETTER_BLOCKS:
    _CONFUSABLE_TABLE.update({_start + i: chr(ord("a") + i) for i in range(26)})
# Leetspeak; "l" joins "1" and "i" so that "k1ll", "kiii" and "kill" fold alike.
_LEET_TABLE = str.maketrans({"0": "o", "1": "i", "l": "i", "3": "e", "4": "a", "5": "s", "7": "t",
                             "8": "b", "9": "g", "@": "a", "$": "s"})
_WORD = re.compile(r"[^\W_]+")
_DROP_IN_FOLD = frozenset(("Mn", "Me", "Cf", "Cc", "Cs", "Co"))
# Scripts written without spaces between words: whole-word matching is meaningless there.
_UNSPACED = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf"
                       "\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")


class Folded(NamedTuple):
    """A text's folded form: its words, and the words with the separators removed."""

    words: tuple[str, ...]
    compact: str  # "".join(words)
    spaced: str  # " ".join(words)
    starts: tuple[int, ...]  # offsets in `compact` where a word starts
    ends: frozenset[int]  # offsets in `compact` where a word ends


def fold(text: str) -> Folded:
    """Fold for matching: casefold, NFKD without marks, lookalikes and leetspeak to ASCII, words."""
    text = unicodedata.normalize("NFKC", text).casefold()
    if not text.isascii():
        text = unicodedata.normalize("NFKD", text)
        text = "".join(ch for ch in text if unicodedata.category(ch) not in _DROP_IN_FOLD)
        text = text.translate(_CONFUSABLE_TABLE)
    words = tuple(_WORD.findall(text.translate(_LEET_TABLE)))
    starts: list[int] = []
    ends: set[int] = set()
    offset = 0
    for word in words:
        starts.append(offset)
        offset += len(word)
        ends.add(offset)
    return Folded(words, "".join(words), " ".join(words), tuple(starts), frozenset(ends))


@dataclass(frozen=True)
class _PhraseSet:
    """Blocklist words or banned prompts, folded; `search` finds one as a run of whole words."""

    exact: frozenset[str] = frozenset()
    prefixes: frozenset[str] = frozenset()
    substrings: tuple[str, ...] = ()
    exact_lengths: tuple[int, ...] = field(init=False)
    prefix_lengths: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "exact_lengths", tuple(sorted({len(w) for w in self.exact})))
        object.__setattr__(self, "prefix_lengths", tuple(sorted({len(w) for w in self.prefixes})))

    @classmethod
    def build(cls, entries: Iterable[str], stems: bool) -> _PhraseSet:
        """`stems`: an entry ending in "*" matches any word run starting with it ("bad*")."""
        exact: set[str] = set()
        prefixes: set[str] = set()
        substrings: set[str] = set()
        for entry in entries:
            if not isinstance(entry, str):
                continue
            entry = entry.strip()
            stem = stems and entry.endswith("*")
            compact = fold(entry.rstrip("*") if stem else entry).compact
            if not compact:
                continue
            if _UNSPACED.search(compact):
                substrings.add(compact)
            else:
                (prefixes if stem else exact).add(compact)
        return cls(frozenset(exact), frozenset(prefixes), tuple(sorted(substrings)))

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes or self.substrings)

    def search(self, folded: Folded) -> bool:
        compact, ends = folded.compact, folded.ends
        size = len(compact)
        for start in folded.starts:
            for length in self.exact_lengths:
                end = start + length
                if end > size:
                    break
                if end in ends and compact[start:end] in self.exact:
                    return True
            for length in self.prefix_lengths:
                if start + length > size:
                    break
                if compact[start:start + length] in self.prefixes:
                    return True
        return any(s in compact for s in self.substrings)


def _read_blocklist_file(path: Path) -> tuple[list[str], list[re.Pattern[str]]]:
    """Words and `re:` regexes from a blocklist file; blank lines and `#` comments are skipped."""
    words: list[str] = []
    regexes: list[re.Pattern[str]] = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("re:"):
                try:
                    regexes.append(re.compile(line[3:].strip(), re.IGNORECASE))
                except re.error as exc:
                    raise ValueError(f"{path}:{number}: bad regex {line[3:].strip()!r}: {exc}") from None
            else:
                words.append(line)
    return words, regexes


# -- state ------------------------------------------------------------------------------------------


@dataclass
class _User:
    messages: deque[float]  # times of the last flood_messages checks (flood)
    accepted: deque[float]  # times of the last rate_limit_per_minute accepted prompts (rate)
    muted_until: float = float("-inf")
    last_seen: float = 0.0


AutomodHook = Callable[[ChatEvent, str], bool]


class Moderator:
    """Checks suggestions; holds per-user rate/flood state and recent texts, in bounded memory.

    `clock` gives monotonic seconds (inject a fake in tests). `automod`, when given and
    `settings.automod` is on, is asked last about the content: `automod(event, cleaned)`
    returns True when the text may pass (an exception counts as a refusal).
    """

    def __init__(self, settings: ModerationSettings, clock: Callable[[], float] = time.monotonic, *,
                 automod: AutomodHook | None = None, max_users: int = 10_000,
                 max_texts: int = 10_000) -> None:
        self.settings = settings
        self._clock = clock
        self._automod = automod
        self._max_users = max(1, max_users)
        self._max_texts = max(1, max_texts)
        self._users: OrderedDict[str, _User] = OrderedDict()  # least recently seen first
        self._recent: OrderedDict[str, float] = OrderedDict()  # folded text -> accepted at, oldest first
        self._banned_key: tuple[str, ...] = ()
        self._banned = _PhraseSet()
        self._deny = {self._login(u) for u in settings.deny_users}
        self._allow = {self._login(u) for u in settings.allow_users}
        self._allow_roles = {Role(r) for r in settings.allow_roles}
        self.reload_blocklist()

    # -- configuration

    def reload_blocklist(self) -> None:
        """(Re)read `blocklist`, `blocklist_regex` and `blocklist_file`; a bad file raises ValueError."""
        words = list(self.settings.blocklist)
        regexes = [re.compile(p, re.IGNORECASE) for p in self.settings.blocklist_regex]
        if self.settings.blocklist_file is not None:
            try:
                file_words, file_regexes = _read_blocklist_file(Path(self.settings.blocklist_file))
            except OSError as exc:
                raise ValueError(f"blocklist_file: {exc}") from None
            words += file_words
            regexes += file_regexes
        self._blocked = _PhraseSet.build(words, stems=True)
        self._regexes = tuple(regexes)

    @staticmethod
    def _login(name: str) -> str:
        return name.strip().lstrip("@").casefold()

    # -- state, for tests and metrics

    @property
    def tracked_users(self) -> int:
        """Users whose rate/flood state is held."""
        return len(self._users)

    @property
    def tracked_texts(self) -> int:
        """Recently accepted texts held for duplicate detection."""
        return len(self._recent)

    # -- the pipeline

    def check(self, event: ChatEvent, text: str, banned: Iterable[str] = (), *,
              commit: bool = True) -> Decision:
        """Moderate `text` (the prompt part of `event`); `banned`: the store's banned prompts.

        With `commit` (the default) an accepted prompt counts at once for the user's rate
        limit and for duplicates; with `commit=False` call `note_accepted` once it is kept.
        """
        settings = self.settings
        now = self._clock()
        self._evict(now)
        if not isinstance(text, str):
            text = ""

        denied = self._denied(event)
        if denied:
            return Decision(False, "user_denied", message=denied)

        user = self._user(event, now)
        if now < user.muted_until:
            return self._flood(user, now)
        user.messages.append(now)
        if len(user.messages) == user.messages.maxlen and now - user.messages[0] <= settings.flood_seconds:
            user.muted_until = now + settings.flood_mute_seconds
            user.messages.clear()
            return self._flood(user, now)

        if len(text) > RAW_LENGTH_FACTOR * settings.max_chars:  # before any work on it
            return self._too_long()
        cleaned = clean_text(text)
        named = _mention_pattern(event.mentions)  # on the cleaned text: "＠bob", "@b\u200bob" are @bob too
        if named is not None and named.search(cleaned):
            if settings.mentions == "refuse":
                return Decision(False, "mention", raw=cleaned, message="prompts may not name people in chat")
            cleaned = clean_text(named.sub(" ", cleaned))
        if not any(unicodedata.category(ch)[0] in "LNPS" for ch in cleaned):
            return Decision(False, "empty", raw=cleaned, message="nothing to show: the prompt is empty")
        if len(cleaned) < settings.min_chars:
            return Decision(False, "too_short", raw=cleaned,
                            message=f"too short: at least {settings.min_chars} characters")
        if len(cleaned) > settings.max_chars:
            return self._too_long(cleaned)

        views = [(cleaned, fold(cleaned))]
        visual = _visual(text)
        if visual is not None:
            shown = clean_text(visual)
            views.append((shown, fold(shown)))
        if any(self._is_blocked(shown, folded) for shown, folded in views):
            return Decision(False, "blocked", raw=cleaned, message="contains a blocked word")
        banned_set = self._banned_set(banned)
        if banned_set and any(banned_set.search(folded) for _, folded in views):
            return Decision(False, "banned", raw=cleaned, message="a moderator banned this prompt")
        if settings.automod and self._automod is not None and not self._automod_ok(event, cleaned):
            return Decision(False, "automod", raw=cleaned, message="held by AutoMod")

        key = self._text_key(cleaned, views[0][1])
        if settings.duplicate_window_seconds > 0 and key in self._recent:
            return Decision(False, "duplicate", raw=cleaned, message="already suggested a moment ago",
                            retry_after=self._recent[key] + settings.duplicate_window_seconds - now)
        accepted = user.accepted
        if len(accepted) == accepted.maxlen and now - accepted[0] < RATE_WINDOW_SECONDS:
            wait = accepted[0] + RATE_WINDOW_SECONDS - now
            return Decision(False, "rate_limited", raw=cleaned, retry_after=wait,
                            message=f"slow down: {accepted.maxlen} prompts a minute; "
                                    f"try again in {max(1, round(wait))} s")

        decision = Decision(True, "accepted", text=self._apply_template(cleaned), raw=cleaned,
                            message="accepted")
        if commit:
            self._note(user, key, now)
        return decision

    def note_accepted(self, event: ChatEvent, decision: Decision) -> None:
        """Count an accepted decision taken with `commit=False` (rate limit and duplicates)."""
        if not decision.accepted:
            return
        now = self._clock()
        self._note(self._user(event, now), self._text_key(decision.raw, fold(decision.raw)), now)

    # -- steps

    def _denied(self, event: ChatEvent) -> str:
        login = self._login(event.login or "")
        if login in self._deny:
            return "you may not suggest prompts in this channel"
        if event.is_moderator:  # the broadcaster and moderators pass the allow lists
            return ""
        if self._allow and login not in self._allow:
            return "only invited viewers may suggest prompts here"
        roles = event.roles or frozenset({Role.VIEWER})
        if not roles & self._allow_roles:
            names = ", ".join(sorted(str(r) for r in self._allow_roles)) or "nobody"
            return f"prompts are open to: {names}"
        return ""

    def _flood(self, user: _User, now: float) -> Decision:
        wait = max(0.0, user.muted_until - now)
        return Decision(False, "flood", retry_after=wait,
                        message=f"too many messages: muted for {max(1, round(wait))} s" if wait
                        else "too many messages at once")

    def _too_long(self, cleaned: str = "") -> Decision:
        return Decision(False, "too_long", raw=cleaned,
                        message=f"too long: at most {self.settings.max_chars} characters")

    def _is_blocked(self, shown: str, folded: Folded) -> bool:
        if self._blocked.search(folded):
            return True
        return any(rx.search(form) for rx in self._regexes for form in (shown, folded.spaced, folded.compact))

    def _banned_set(self, banned: Iterable[str]) -> _PhraseSet:
        key = tuple(b for b in banned if isinstance(b, str))
        if key != self._banned_key:  # the store's list rarely changes: fold it once per change
            self._banned_key = key
            self._banned = _PhraseSet.build(key, stems=False)
        return self._banned

    def _automod_ok(self, event: ChatEvent, cleaned: str) -> bool:
        try:
            return bool(self._automod(event, cleaned))  # type: ignore[misc]
        except Exception:  # the hook's failure must not crash chat handling: refuse instead
            return False

    def _apply_template(self, cleaned: str) -> str:
        # str.format parses only the template; braces in the viewer's text are plain characters.
        try:
            return self.settings.template.format(prompt=cleaned, style=self.settings.style).strip()
        except (KeyError, IndexError, ValueError, AttributeError):
            return cleaned

    @staticmethod
    def _text_key(cleaned: str, folded: Folded) -> str:
        return folded.compact or cleaned.casefold()

    # -- bounded state

    def _user(self, event: ChatEvent, now: float) -> _User:
        # Per label: a redemption (paid for) draws on a budget of its own, not on the user's chat prompts.
        key = f"{event.label}\x00{event.user_id or event.login}"
        user = self._users.get(key)
        if user is None:
            settings = self.settings
            rate = (settings.redemption_rate_limit_per_minute if event.redemption_id
                    else settings.rate_limit_per_minute)
            user = _User(deque(maxlen=settings.flood_messages), deque(maxlen=rate))
            self._users[key] = user
            while len(self._users) > self._max_users:
                self._users.popitem(last=False)
        else:
            self._users.move_to_end(key)
        user.last_seen = now
        return user

    def _note(self, user: _User, key: str, now: float) -> None:
        user.accepted.append(now)
        if self.settings.duplicate_window_seconds > 0:
            self._recent.pop(key, None)
            self._recent[key] = now
            while len(self._recent) > self._max_texts:
                self._recent.popitem(last=False)

    def _evict(self, now: float) -> None:
        """Forget idle users and expired texts; amortised O(1) per call (both are in time order)."""
        idle = max(RATE_WINDOW_SECONDS, self.settings.flood_seconds)
        while self._users:
            user = next(iter(self._users.values()))
            if now - user.last_seen <= idle or now < user.muted_until:
                break
            self._users.popitem(last=False)
        window = self.settings.duplicate_window_seconds
        while self._recent:
            at = next(iter(self._recent.values()))
            if now - at < window:
                break
            self._recent.popitem(last=False)
