"""Chat command parsing: `!prompt`, `!vote` and the moderator commands; never a crash."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat.commands import (
    COMMAND_KINDS,
    MODERATOR_KINDS,
    REFUSAL_REASONS,
    BanPromptCommand,
    Command,
    PauseCommand,
    PromptCommand,
    Refusal,
    ResumeCommand,
    SkipCommand,
    VetoCommand,
    VoteCommand,
    parse_command,
)
from chat.events import ChatEvent, Role
from chat.settings import CommandSettings

DEFAULTS = CommandSettings()
VIEWER = frozenset({Role.VIEWER})
MODERATOR = frozenset({Role.MODERATOR})


def event(text: str, roles: frozenset[Role] = VIEWER) -> ChatEvent:
    return ChatEvent(source="twitch", message_id="m1", user_id="42", login="alice", display_name="Alice",
                     text=text, time=0.0, roles=roles)


def parse(text: str, roles: frozenset[Role] = VIEWER, cmd_settings: CommandSettings = DEFAULTS, **kw):
    return parse_command(event(text, roles), cmd_settings, **kw)


# -- ordinary chat


@pytest.mark.parametrize("text", ["hello chat", "", "   ", "!", "! prompt a cat", "prompt a cat", "a !vote 2",
                                  "!hello there", "!votes 2", "!prompting a cat"])
def test_ordinary_chat_and_unknown_commands_are_not_commands(text):
    assert parse(text) is None


def test_a_very_long_first_word_is_not_a_command():
    assert parse("!" + "v" * 10_000 + " 2") is None


# -- !prompt


def test_prompt_keeps_its_text_verbatim():
    assert parse("!prompt A Cat {style} in  the rain!") == PromptCommand(text="A Cat {style} in  the rain!")


def test_prompt_alias_works():
    assert parse("!p a red fox") == PromptCommand(text="a red fox")


def test_command_word_is_case_insensitive():
    assert parse("!PrOmPt a red fox") == PromptCommand(text="a red fox")


def test_surrounding_whitespace_of_the_argument_is_dropped():
    assert parse("   !prompt \t a red fox  \n") == PromptCommand(text="a red fox")


def test_prompt_without_text_is_bad_syntax():
    result = parse("!prompt")

    assert result == Refusal("bad_syntax", "usage: !prompt <text>", "prompt")


def test_prompt_with_only_invisible_text_is_bad_syntax():
    assert parse("!prompt \u200b\u202e \U000e0000").reason == "bad_syntax"


def test_fullwidth_command_word_is_recognised():
    assert parse("！ＰＲＯＭＰＴ a red fox") == PromptCommand(text="a red fox")


def test_zero_width_characters_inside_the_command_word_are_ignored():
    assert parse("!pro\u200bmpt a red fox") == PromptCommand(text="a red fox")


def test_a_twitch_reply_mention_before_the_command_is_skipped():
    assert parse("@promptbot !vote 2") == VoteCommand(option=2)


# -- !vote


def test_vote_with_a_number():
    assert parse("!vote 2") == VoteCommand(option=2)


@pytest.mark.parametrize("text", ["!v 3", "!vote #3", "!VOTE 3", "!vote ３", "!vote 3 \U000e0000"])
def test_vote_spellings(text):
    assert parse(text) == VoteCommand(option=3)


@pytest.mark.parametrize("text", ["!vote 2 that one!", "!vote 2!", "!vote #2, please", "!v 2 😍 2 is best"])
def test_vote_ignores_what_follows_the_number(text):
    assert parse(text) == VoteCommand(option=2)


@pytest.mark.parametrize(("text", "option"), [
    ("!vote ٣", 3),  # Arabic-Indic
    ("!vote ۳", 3),  # Extended Arabic-Indic (Persian)
    ("!vote ३", 3),  # Devanagari
    ("!vote ৩ ভালো", 3),  # Bengali, then a word
    ("!vote ๓", 3),  # Thai
    ("!vote 𝟑", 3),  # mathematical bold (NFKC)
    ("!vote ​٢​", 2),  # zero-width spaces around it
])
def test_vote_accepts_any_unicode_decimal_digit(text, option):
    assert parse(text) == VoteCommand(option=option)


@pytest.mark.parametrize("text", ["!vote ½", "!vote Ⅲ", "!vote 三"])
def test_vote_refuses_numerals_that_are_not_decimal_digits(text):
    assert parse(text) == Refusal("bad_syntax", "usage: !vote <1-4>", "vote")


@pytest.mark.parametrize(("text", "option"), [("!vote ²", 2), ("!vote ③", 3)])
def test_vote_takes_compatibility_digits_as_nfkc_reads_them(text, option):
    assert parse(text) == VoteCommand(option=option)


@pytest.mark.parametrize("text", ["!vote abc", "!vote", "!vote 2 3", "!vote -1", "!vote 1.5", "!vote 2abc",
                                  "!vote 2nd", "!vote one 2", "!vote 1,2", "!vote ٢ ٣"])
def test_vote_without_exactly_one_number_is_bad_syntax(text):
    assert parse(text) == Refusal("bad_syntax", "usage: !vote <1-4>", "vote")


@pytest.mark.parametrize("text", ["!vote 0", "!vote 5", "!vote 999999"])
def test_vote_out_of_range_is_bad_option(text):
    result = parse(text)

    assert isinstance(result, Refusal)
    assert result.reason == "bad_option"
    assert "1 to 4" in result.message


def test_vote_range_follows_the_round_size():
    assert parse("!vote 7", vote_options=9) == VoteCommand(option=7)
    assert parse("!vote abc", vote_options=9).message == "usage: !vote <1-9>"


def test_vote_is_open_to_viewers():
    assert parse("!vote 1", roles=frozenset({Role.VIEWER})) == VoteCommand(option=1)


# -- moderator commands


@pytest.mark.parametrize(("text", "expected"), [
    ("!skip", SkipCommand()),
    ("!skip this is boring", SkipCommand()),
    ("!veto", VetoCommand(option=None)),
    ("!veto 2", VetoCommand(option=2)),
    ("!pause", PauseCommand()),
    ("!resume", ResumeCommand()),
    ("!banprompt A Giant Spider", BanPromptCommand(text="A Giant Spider")),
])
def test_moderator_commands_from_a_moderator(text, expected):
    assert parse(text, roles=MODERATOR) == expected


def test_the_broadcaster_may_run_moderator_commands():
    assert parse("!pause", roles=frozenset({Role.BROADCASTER})) == PauseCommand()


@pytest.mark.parametrize("roles", [VIEWER, frozenset({Role.VIP}), frozenset({Role.SUBSCRIBER, Role.VIEWER})])
@pytest.mark.parametrize("text", ["!skip", "!veto", "!veto 2", "!pause", "!resume", "!banprompt spiders"])
def test_moderator_commands_are_refused_for_viewers(text, roles):
    result = parse(text, roles=roles)

    assert isinstance(result, Refusal)
    assert result.reason == "not_allowed"
    assert "moderators" in result.message


def test_not_allowed_comes_before_syntax():
    assert parse("!veto abc").reason == "not_allowed"


def test_banprompt_without_text_is_bad_syntax():
    expected = Refusal("bad_syntax", "usage: !banprompt <text>", "banprompt")

    assert parse("!banprompt", roles=MODERATOR) == expected


def test_veto_target_is_the_option_number_or_none_for_the_current_prompt():
    assert parse("!veto 3", roles=MODERATOR).target == 3
    assert parse("!veto", roles=MODERATOR).target is None


def test_veto_with_a_word_is_bad_syntax():
    assert parse("!veto abc", roles=MODERATOR).reason == "bad_syntax"


def test_veto_out_of_range_is_bad_option():
    assert parse("!veto 8", roles=MODERATOR).reason == "bad_option"


# -- settings


def test_prefix_and_aliases_come_from_settings():
    custom = CommandSettings(prefix="pc!", prompt=["suggest"], vote=["pick", "choose"])

    assert parse("PC!suggest a red fox", cmd_settings=custom) == PromptCommand(text="a red fox")
    assert parse("pc!choose 2", cmd_settings=custom) == VoteCommand(option=2)
    assert parse("!prompt a red fox", cmd_settings=custom) is None
    assert parse("pc!pick x", cmd_settings=custom).message == "usage: pc!pick <1-4>"


def test_command_kinds():
    assert COMMAND_KINDS == ("prompt", "vote", "skip", "veto", "pause", "resume", "banprompt")
    assert set(MODERATOR_KINDS) == {"skip", "veto", "pause", "resume", "banprompt"}
    assert PromptCommand(text="x").kind == "prompt"
    assert not PromptCommand.moderator_only
    assert BanPromptCommand.moderator_only


# -- never a crash

ROLE_SETS = st.frozensets(st.sampled_from(list(Role)), max_size=5)
WORDS = st.sampled_from(["!prompt", "!p", "!vote", "!v", "!skip", "!veto", "!pause", "!resume", "!banprompt",
                         "！vote", "!VOTE", "@bot !vote", "!", ""])


def _check_result(result):
    assert result is None or isinstance(result, Command | Refusal)
    if isinstance(result, Refusal):
        assert result.reason in REFUSAL_REASONS
        assert result.message
        assert result.kind in COMMAND_KINDS
    if isinstance(result, Command):
        assert result.kind in COMMAND_KINDS


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300), roles=ROLE_SETS)
def test_any_text_parses_without_raising(text, roles):
    _check_result(parse(text, roles=roles))


@settings(max_examples=300, deadline=None)
@given(word=WORDS, rest=st.text(max_size=100), roles=ROLE_SETS, options=st.integers(-3, 12))
def test_any_arguments_parse_without_raising(word, rest, roles, options):
    result = parse(f"{word} {rest}", roles=roles, vote_options=options)

    _check_result(result)
    if isinstance(result, VoteCommand):
        assert 1 <= result.option <= options


# Long strings: a random piece repeated (hypothesis cannot draw 10 kB of entropy per example).
LONG_TEXT = st.builds(lambda piece, times, tail: piece * times + tail,
                      st.text(min_size=1, max_size=100), st.integers(100, 400), st.text(max_size=50))


@settings(max_examples=30, deadline=None)
@given(text=LONG_TEXT)
def test_long_texts_parse_without_raising(text):
    _check_result(parse("!prompt " + text))
    _check_result(parse(text))
