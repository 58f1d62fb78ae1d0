"""Answer extraction and checking, shared by preference-pair construction and benchmark evaluation.

Mirrors, from OpenGVLab/InternVL `internvl_chat/tools/mm_reasoning_pipeline/`:
- `internvl_lmdeploy_correctness.py`: the English v1 chain-of-thought instruction (`COT_INSTRUCTION`)
  and the stripping of a trailing short-answer instruction before wrapping the question in it.
- `internvl_lmdeploy_correctness_postprocess.py` `parse_answer`: the final answer is the rest of the
  line after the first "Final answer:" or "Answer:" (case-insensitive), stripped of `*`. In strict
  mode (pair construction) its format rules apply too: the matched trigger appears at most twice and
  some reasoning comes before it; a response failing them is a format negative.
and from open-compass/VLMEvalKit:
- `vlmeval/vlm/internvl/utils.py` `build_mpo_prompt` (options appended as "A. text" lines, then the
  same CoT instruction) and `mpo_post_processing` (the same extraction; the whole response when no
  trigger is found);
- `vlmeval/utils/matching_util.py` `can_infer`: an option letter standing alone exactly once, else
  the one option whose text the answer contains;
- `vlmeval/dataset/utils/yorn.py` `YOrN_Extraction`: "yes" without "no" or the reverse.

Additions, each a superset of the above: `\\boxed{}` answers (VLMEvalKit's `extract_boxed_content`), an
answer in display math that opens on the trigger's line ("Final answer:\\n$$\\n12\\n$$"; the official reads
"$$"), the Chinese trigger "答案:" of the official Chinese prompt, explicit letter statements ("The answer is
B", "option (C)", "答案是C", which VLMEvalKit hands to its judge model), numbers read with units (a known unit
on both sides must agree: "5 m" is not "5 cm"), thousands commas (and other locales' groups: "1.234.567",
"1.234,5", "1'234", no-break and thin spaces, "1,00,000", the Arabic separators; not after a lone 0 nor after a decimal
point: "0,125" and "3.0,125" are no number), percentages, fractions (a/b, "½", LaTeX
`\\frac` also as \\frac12), scientific notation ("3 × 10^5", "6.02 \\times 10^{23}"), magnitude words ("1.2
million", "3万", "2.5亿", "3 thousand 5 hundred"; not abbreviations such as "1.2M"), the root of a perfect power alone ("∛8" is 2,
"\\sqrt{9}" is 3, "∛-8" -2; other roots are expressions, no number), negative numbers (also with an en dash, "minus",
"negative" or 负 for the minus) and full-width ones, Chinese numerals where they stand as a number ("答案是三",
"三只", "百分之五十", "三分之一", "三点五"; not "一些", "唯一", "第三", "三四个"), and number words that count something in short
answers ("three", "there is one", "none"; not "the one on the left", "the big red one"), compared exactly
for integers and with a relative tolerance otherwise, as the official `math_score` (so "2/3" is "0.667" but
not "0.67"; a bound or negation, "more than 5", "not 5", "5+", is no number), yes/no variants (true/false,
是/否, 有/没有; 可能 and 无法确定 are hedges), and short text compared after normalisation (NFKC, which also folds CJK
full-width forms; case; punctuation, inline-math `$` and LaTeX text wrappers such as "\\text{Paris}";
English articles; number words, "none" as 0; whitespace, none kept next to CJK characters); a text ground
truth holding a root or pi is compared by its written math form instead (`normalize_math`: "√2", "sqrt(2)"
and "\\sqrt{2}" alike, "∛2" and "\\sqrt[3]{2}", "3π" and "3\\pi", "\\frac{\\sqrt{3}}{2}" and "√3/2"; no
algebra; of "2√3 ≈ 3.46" the exact form, while a number reads the decimal). The official checker for pairs
uses the TextVQA evaluator and a 1e-3 relative tolerance for math; the normalisation here is close to
TextVQA's but not identical.

Stricter than `can_infer`: a negated letter ("not A", "isn't B", "不是A") and an answer that copies the
options list with their letters pick no option (VLMEvalKit reads "Not A" as A), and "A" before another
option's text is the article ("A cat" names the option "cat"; VLMEvalKit reads A); a numeric option's text is
not found inside a longer number (option "1" in "10", "1.5" or "-1"; VLMEvalKit finds it).

`check_answer` returns None when the prediction cannot be read as the expected kind (no option
letter, no number or several different ones, neither yes nor no): the pair builder files such
responses as format negatives, the evaluator counts them wrong.
"""

from __future__ import annotations

import itertools
import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import NamedTuple

from internvl_mpo.errors import InputError

COT_INSTRUCTION = (
    "Your task is to answer the question below. "
    "Give step by step reasoning before you answer, and when you're ready to answer, "
    'please use the format "Final answer: .."'
    "\n\n"
    "Question:"
    "\n\n"
    "{question}"
)

# Trailing instructions that ask for a bare answer; they contradict the CoT instruction. The first four
# are the correctness pipeline's list, the others VLMEvalKit's prompt suffixes.
ANSWER_INSTRUCTIONS = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Please answer Yes or No.",
    "Please answer the question and put the final answer within \\boxed{}.",
    "Please answer yes or no.",
    "Answer the question directly.",
    "请直接回答选项字母。",
    "请直接回答问题。",
)

KINDS = ("choice", "number", "yesno", "text")

_TRIGGER = re.compile(r"(final answer\**\s*[:：]|answer\**\s*[:：]|答案\**\s*[:：])\s*(.*)", re.IGNORECASE)
_BOXED = "\\boxed{"
_DISPLAY_MATH = {"$$": "$$", "\\[": "\\]"}  # opening -> closing delimiter
_LETTER_ONLY = re.compile(r"[(\[（]?\s*([A-Za-z])\s*[)\]）]?\s*[.:：]?")
_LEADING_LETTER = re.compile(r"[(\[（]([A-Z])[)\]）]|([A-Z])[.:：)\]）,](?!\d)")
# What follows an option letter that is one of a list of letters ("A, B", "(A) or (C)", "A和B", "A, or maybe B",
# "(A)(C)"): the next letter, bracketed or standing alone (a capital "A" before a lowercase word is the article:
# "B, A cat"), maybe after a hedge word.
_LETTER_LIST_TAIL = re.compile(
    r"[)\]）]?\.?\s*(?:[,/&、;]|\b(?:and|or)\b|和|或|(?<=[)\]）])(?=\s*[(\[（]))\s*(?:(?:and|or)\s+)?"
    r"(?:(?i:maybe|perhaps|possibly|probably)\s+)?"
    r"(?:[(\[（]([A-Z])[)\]）]|([A-Z])(?![A-Za-z])(?!(?<=A)\s+[a-z]))"
)
_STATED_LETTER = re.compile(
    r"(?:(?i:answer|option|choice)\s*(?i:is|would be|should be)?\s*[:：]?\s*(?i:option)?"
    r"|(?:答案|选项|选择|选)\s*(?:是|为|应为|应该是)?\s*[:：]?\s*(?:选项)?)"
    r"\s*[(\[（]?([A-Z])(?![A-Za-z])"
)
_ANSWER_WORD = re.compile(r"(?i:answer)|答案")  # a stated letter that says it is the answer, not an option named
# A negated letter ("not A", "isn't (B)", "不是A") is no pick: parse_choice drops it, keeping the word.
_NEGATED_LETTER = re.compile(
    r"(\b(?i:not|never)\s+(?i:option\s+|choice\s+)?|n't\s+(?i:option\s+)?|不是\s*(?:选项)?)[(\[（]?[A-Z][)\]）]?(?![A-Za-z])"
)
# Option letters without an options list: the official post-processing's A-N, less "I" (a pronoun far
# more often than an option). A bare ground truth "I" or "O"-"Z" is compared as text.
_LETTERS = "ABCDEFGHJKLMN"
_CJK = r"\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
# never before ".digit": "1.2.3" (a version, a date) is no number, as float() and the official check read none
_NUMBER = r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?(?!\.?\d)"
# Digits right after a letter, digit, "." or "^" belong to a word or unit ("CO2", "cm^2"), not a number.
_NUMBER_RE = re.compile(rf"(?<![A-Za-z\d.^])({_NUMBER})(?:\s*/\s*({_NUMBER}))?(\s*%)?")
_UNIT = r"[A-Za-z]+(?:\^\d|[²³])?"  # "cm", "m^2", "km²", "centimeters", "triangles"
# Chinese measure words: a numeral before one is a number ("三只"), and so is a ground truth "5个".
_CN_MEASURES = "个只条张辆本件位头匹棵朵次岁人名块种处层根支把台艘架颗片双份杯瓶盒箱度米元倍秒天周"
# A root, pi or a number's power (10^k is already a number): an expression, not the number written in it.
_ROOTS = "√∛∜"  # square, cube and fourth root signs: degree 2 + index
_EXPRESSION = re.compile(rf"\\sqrt|[{_ROOTS}]|\\pi|π|\d\s*\^\s*\{{?\s*[-+]?\d")
# The root of a digit run standing alone ("√9", "∛(8)" after `_numeric_text`, "\\sqrt[3]{8}"): `parse_number`
# reads it as its root where that is a whole number; a factor before it ("2∛8") leaves an expression.
_ROOT_OF_DIGITS = re.compile(
    rf"(?<![A-Za-z\d.)}}])(?:([{_ROOTS}])|\\sqrt(?:\s*\[\s*(\d)\s*\])?)"
    r"\s*(?:\{\s*(-?\d{1,15})\s*\}|(-?\d{1,15})(?![\d.^]))"
)
# Units compared when both answers name one ("5 m" is not "5 cm"); others ("apples", "in") are not.
_UNIT_NAMES = {
    "mm": ("mm", "millimeter", "millimetre"), "cm": ("cm", "centimeter", "centimetre"), "m": ("m", "meter", "metre"),
    "km": ("km", "kilometer", "kilometre"), "ft": ("ft", "foot", "feet"), "mi": ("mi", "mile"),
    "g": ("g", "gram"), "kg": ("kg", "kilogram"), "s": ("s", "sec", "second"), "min": ("min", "minute"),
    "h": ("h", "hr", "hour"), "day": ("day",), "°": ("°", "deg", "degree"), "l": ("l", "liter", "litre"),
    "ml": ("ml", "milliliter", "millilitre"), "ms": ("ms", "millisecond"), "week": ("wk", "week"),
    "month": ("month",), "year": ("yr", "year"), "lb": ("lb", "pound"), "oz": ("oz", "ounce"), "mph": ("mph",),
    "am": ("am",), "pm": ("pm",), "inch": ("inch", "inches"), "gal": ("gal", "gallon"),
}
# Chinese units after a number ("3千米", "5分钟"), as the English ones they name
_CN_UNIT_NAMES = {"毫米": "mm", "厘米": "cm", "千米": "km", "公里": "km", "米": "m", "千克": "kg", "公斤": "kg", "克": "g",
             "毫升": "ml", "升": "l", "毫秒": "ms", "秒": "s", "分钟": "min", "小时": "h", "天": "day", "周": "week",
             "年": "year"}
_UNITS = {name: unit for unit, names in _UNIT_NAMES.items() for name in names} | _CN_UNIT_NAMES
_CN_UNIT = "|".join(sorted(_CN_UNIT_NAMES, key=len, reverse=True))  # longest first: 千米 before 米
_UNIT_ONLY = re.compile(
    rf"\s*[$€£¥]?\s*{_NUMBER}(?:\s*/\s*{_NUMBER})?\s*"
    rf"(?:%|(?:°|degrees?)(?:\s*[A-Za-z]+)?|{_UNIT}(?:/{_UNIT})?|{_CN_UNIT}|[{_CN_MEASURES}])?\s*[.。]?\s*"  # "30 °C"
)
_WORD_NUMBERS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40,
    "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "none": 0,
}
_TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_UNITS_1_9 = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# "twenty one", "twenty-one": one number (21), read before the single words ("twenty" then "one" gave 20)
_TENS_AND_UNIT = re.compile(rf"\b({'|'.join(_TENS)})(?:\s+|-)({'|'.join(_UNITS_1_9)})\b", re.IGNORECASE)
# A half or a quarter after "N and a" read as their value ("2 and a half" is 2.5); dozens, thirds and fifths after a
# number leave no number to read, rather than the N alone ("3 dozen" may answer "how many dozen" or "how many eggs");
# "3 quarters", "2 halves" stay counts (coins, pieces).
_AND_A_PART = re.compile(r"(?<![\w.])(\d+)\s+and\s+(?:a|an|one|1)\s+(half|quarter)\b", re.IGNORECASE)
_PART_AFTER = re.compile(r"\s+(?:and\s+(?:a|an|one|1)\s+(?:half|quarter)|thirds?|fifths?|dozens?)\b", re.IGNORECASE)
# A number word, or "no" before a word ("no green shapes": 0); read only in short answers, and only
# where it counts something (`_is_count`).
_NUMBER_WORD = re.compile(rf"\b(?:{'|'.join(_WORD_NUMBERS)}|no(?=\s+\w))\b", re.IGNORECASE)
# Right before a number word, these make it pick out ("the three", "the other two", "which one") or
# negate ("not one", "no one"), not count.
_NOT_A_COUNT_AFTER = {
    "a", "an", "the", "this", "that", "these", "those", "which", "what", "each", "any", "every", "another",
    "other", "either", "neither", "no", "not",
}
# Right before "one", these make it a count ("there is one", "only one", "it has one").
_COUNT_AFTER = {
    "is", "are", "was", "were", "be", "there's", "it's", "that's", "here's", "has", "have", "had", "only",
    "just", "exactly", "contains", "contain", "shows", "show", "see", "sees", "saw", "count", "counted",
}
# Words that cannot be the noun a count word goes with ("one apple", "no green shapes"): prepositions,
# conjunctions, relatives, pronouns, adverbs, auxiliaries ("the one on the left", "No it is not").
_NOT_A_NOUN = {
    "of", "on", "in", "at", "to", "from", "with", "without", "by", "near", "next", "under", "over", "above",
    "below", "behind", "beside", "between", "inside", "outside", "for", "about", "like", "than", "into",
    "and", "or", "but", "that", "which", "who", "whom", "whose", "where", "when", "if", "so", "because", "as",
    "i", "you", "he", "she", "it", "we", "they", "me", "him", "her", "us", "them", "this", "these", "those",
    "my", "your", "his", "its", "our", "their", "here", "there", "too", "also", "again", "instead", "only",
    "now", "then", "please", "is", "are", "was", "were", "be", "been", "am", "has", "have", "had", "do",
    "does", "did", "can", "could", "will", "would", "shall", "should", "may", "might", "must",
}
_HEDGES_AFTER_NO = {"idea", "clue", "answer", "doubt", "way"}  # "no idea" is no 0
_CN_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_CN_UNITS = {"十": 10, "百": 100, "千": 1000}
_CN_SECTIONS = {"万": 10**4, "亿": 10**8}
_CN_RUN = "[" + "".join(_CN_DIGITS) + "".join(_CN_UNITS) + "".join(_CN_SECTIONS) + "]+"
# "三分之一" is 1/3, "百分之五十" 50%, "三点五" 3.5 and "三点五万" 35000 (decimals digit by digit)
_CN_NUMERAL = re.compile(rf"(?:({_CN_RUN})分之)?({_CN_RUN})(?:点([零〇一二三四五六七八九]+)([万亿]*))?")
# A number times magnitude words ("1.2 million", "3 hundred thousand", "3万", "2.5亿", "1.5万亿", "5千万"), read
# as 1.2e6 and so on. Abbreviations are not read ("5M" may be metres, "0.5M" molar, "$5M$" LaTeX), nor 千/百
# before a unit they prefix ("3千米" is 3 km), nor a magnitude a number runs on after ("3万5千").
_MAGNITUDES = {  # powers of ten
    "hundred": 2, "thousand": 3, "million": 6, "billion": 9, "trillion": 12, "十": 1, "百": 2, "千": 3, "万": 4, "亿": 8,
}
_MAGNITUDE = re.compile(
    r"(?<![A-Za-z\d.^/])(\d+(?:\.\d+)?)((?:\s*(?:hundred|thousand|million|billion|trillion)s?\b)+"
    r"|\s*(?:[十百千]?(?:万亿|[万亿])(?!\d)|[十百千](?![\d分米克瓦焦帕赫卡伏])))",
    re.IGNORECASE,
)
# "a"/"an" before an English magnitude word is one of it in short answers, as number words are ("a
# million"); a chain of English magnitudes that
# fall, maybe ending in a number below the last ("3 thousand 5 hundred", "2 million 300 thousand and 7"),
# adds up (`_magnitude_sum`).
_A_MAGNITUDE = re.compile(r"\b(?:a|an)\s+(?=(?:hundred|thousand|million|billion|trillion)\b)", re.IGNORECASE)
_ENGLISH_MAGNITUDE = r"(?:\s*(?:hundred|thousand|million|billion|trillion)s?\b)+"
_MAGNITUDE_TERM = re.compile(rf"(\d+(?:\.\d+)?)({_ENGLISH_MAGNITUDE})", re.IGNORECASE)
_MAGNITUDE_CHAIN = re.compile(
    rf"(?<![A-Za-z\d.^/])\d+(?:\.\d+)?{_ENGLISH_MAGNITUDE}"
    rf"(?:(?:\s+and)?\s+\d+{_ENGLISH_MAGNITUDE})*(?:(?:\s+and)?\s+(\d+)(?![\d.]))?",
    re.IGNORECASE,
)
# A Chinese numeral stands as a number only next to punctuation, a non-CJK character, one of these words
# before it ("答案是三", "共五个", "负五") or a measure word after it ("三只"); elsewhere it is part of a word
# ("一些", "唯一", "第三", "三角形").
_CN_BEFORE = "是为有共计约于剩负"
# \\frac{a}{b}, also \\dfrac and \\tfrac, and with a one-digit argument unbraced (\\frac12, \\frac{1}2).
_FRAC = re.compile(r"\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
# LaTeX wrappers around the words of a short answer: "\\text{Paris}" is "Paris".
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\{([^{}]*)\}")
_DASH_MINUS = str.maketrans("\u2212\u2013", "--")  # a unicode minus, or an en dash written for one
# the Arabic decimal and thousands separators and percent sign
_ARABIC_SEPARATORS = str.maketrans("\u066b\u066c\u066a", ".,%")
# Thousands groups of other locales (`_ungroup`): two or more dots, or dots before a decimal comma
# ("1.234.567", "1.234,5"); apostrophes ("1'234"); no-break, narrow and thin spaces ("1 234,5", "1 234.5"); lakh commas
# ("1,00,000"). One dot keeps its English reading ("1.000" is 1), and a plain space or a decimal comma alone
# groups nothing ("3 100", "12,5" may be lists). A first group never starts with 0.
_GROUPED = re.compile(
    r"(?<![\d'\u2019])(?<!\d[.,])(?!0)(?:\d{1,3}(?:\.\d{3}){2,}(?:,\d+)?|\d{1,3}(?:\.\d{3})+,\d+"
    r"|\d{1,3}(?:['\u2019]\d{3})+(?:\.\d+)?|\d{1,3}(?:[\u00a0\u202f\u2009]\d{3})+(?:[.,]\d+)?"
    r"|\d{1,2}(?:,\d{2})+,\d{3}(?:\.\d+)?)(?![\d'\u2019]|[.,]\d)"
)
# English thousands commas: groups of three digits after a whole number that is not a lone 0 ("0,125" groups
# nothing: a list, or a decimal comma as "12,5") nor a decimal's fraction digits ("3.0,125" is no 3.0125)
_THOUSANDS_COMMAS = re.compile(r"(?<![\d.])(?!0,)\d+(?:,\d{3}(?!\d))+")
_VULGAR_FRACTIONS = "¼½¾⅐⅑⅒⅓⅔⅕⅖⅗⅘⅙⅚⅛⅜⅝⅞"
# Words and signs that make a number a bound or a negation, not the answer ("more than 5", "not 5",
# "5 or more", "5+", "over 5", "up to 5", "±5", "至少5个", "5个以上"); "about 5", "nearly 5", "~5" and "5 or so" are
# still 5.
_BOUND_BEFORE = re.compile(
    r"(?:\b(?:more|less|fewer|greater|larger|smaller|higher|lower|other)\s+than|\bat\s+(?:least|most)|\bnot"
    r"|\b(?:over|above|under|below|up\s+to)|n't|[<>≤≥±]|不是|不到|超过|至少|至多|最多|最少|多于|少于"
    r"|大于|小于|不止)\s*$",
    re.IGNORECASE,
)
_BOUND_AFTER = re.compile(
    r"\s*(?:(?:[A-Za-z]{1,6}\s+)?or\s+(?:more|less|fewer|greater|higher|lower|above|below)\b|\+(?![\d.])"
    r"|[个只]?(?:以上|以下|多|余))",
    re.IGNORECASE,
)
# A clause word, maybe after a bracket, that opens what an answer is given ("12 cm, given that r = 6", "5 (where y =
# 3)"); a bracket alone opens no given: "2 × (3 + 4) = 14" is a calculation
_GIVEN_CLAUSE = re.compile(r"(?:\(\s*)?\b(?:since|where|given|when|because|if|assuming)\b", re.IGNORECASE)
# "minus 5", "negative 5", "负5": -5 (also after number words become digits: "negative five")
_MINUS_WORD = re.compile(r"(?:\b(?:minus|negative)\s+|负\s*)(?=[\d.(])", re.IGNORECASE)
_PERCENT_WORD = re.compile(r"\s*percent", re.IGNORECASE)
# the word after a number, for `_unit`; a Chinese unit not at the start of a longer word (3年级 is grade 3, 2周岁 an age)
_UNIT_WORD = re.compile(rf"\s*(°|[A-Za-z]+|(?:{_CN_UNIT})(?![{_CJK}]))")
_DEGREE_SCALE = re.compile(r"\s*(celsius|centigrade|fahrenheit|c|f)(?![a-z])", re.IGNORECASE)  # after "°" or "degrees"
# A root or pi in a text ground truth: compared as math (`normalize_math`).
_MATH_MARK = re.compile(rf"\\sqrt|[{_ROOTS}]|\b(?:sqrt|cbrt)\s*\(|\\pi|π")
_SUPERSCRIPTS = "⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺"
_FROM_SUPERSCRIPT = str.maketrans(_SUPERSCRIPTS, "0123456789-+")
_SHORT_ANSWER_WORDS = 5
REL_TOL = 1e-3  # numbers that are not whole match within 0.1%, the official `math_score` tolerance
_YES = {"yes", "true", "correct", "yeah", "yep"}
_NO = {"no", "false", "incorrect", "nope"}
_VERDICTS = {"true", "false", "correct", "incorrect"}  # a leading one decides only where no yes or no follows
_ARTICLES = {"a", "an", "the"}
# spaces around a math operator in a short text answer: "y = 2x + 1" is "y=2x+1" (the TextVQA normaliser, which drops
# or spaces "=", "+", "<" and ">" as punctuation, reads them alike; the operators are kept, so "x<3" is not "x>3")
_SPACED_OPERATOR = re.compile(r"\s*([=+<>^×÷±≤≥≠])\s*")
# Chinese yes/no by how the answer starts, checked in this order: hedges ("maybe", "cannot tell"), yes
# that starts like a no (没错, "not wrong"), no, yes (有/没有 answer "is there ...?").
_CN_HEDGES = ("可能", "有可能", "也许", "或许", "无法", "没法", "没有办法", "不确定", "不知道", "不清楚", "难以")
_CN_NOT_WRONG = ("没错", "没有错")
# English hedges that hold a "no" or "not" but answer neither ("no idea", "not sure", "cannot determine"), read where
# the answer does not start with yes or no ("No, I am not sure" is a no); a reason for a no ("not visible", "cannot
# see any") is no hedge
# ... said by the answer (no subject, or I, we, it: "I am not sure"), not of someone in the picture ("The woman looks
# uncertain, but yes")
_HEDGER = re.compile(r"(?:^|[.;,:!?]\s*)(?:(?:i|i'm|im|we|we're|it|it's|this|that|am|are|is|really|honestly|just)"
                     r"\s+)*$")
_HEDGE = re.compile(r"\b(?:no\s+(?:idea|clue)|no\s+way\s+to\s+(?:tell|know|say|determine)|not\s+(?:sure|certain)|unsure"
                    r"|uncertain|(?:cannot|can't|can\s+not|unable\s+to|impossible\s+to)\s+(?:be\s+)?(?:determined?"
                    r"|tell|say|know))\b")
_CN_NO = ("不是", "否", "不对", "不正确", "错", "没有")
_CN_YES = ("是", "对", "正确", "有")


class Number(NamedTuple):
    value: float
    percent: bool
    # the number as written, exactly, where it is 2**53 or more, past which float() rounds integers (123456789012345678
    # and ...679 are one float); None below that, and where its exponent is too large to write out
    exact: Fraction | None = None


EXACT_FLOAT_INTEGERS = 2**53  # every integer up to here is a float of its own


def _exact(text: str) -> Fraction | None:
    """A `_NUMBER` match as an exact fraction; None where its exponent is too large to write out (1e999999 is
    no number to build: float() reads it as infinity at once)."""
    exponent = text.lower().partition("e")[2]
    if len(exponent.lstrip("+-").lstrip("0")) > 3:
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):  # past Python's digit limit for int()
        return None


# ----------------------------------------------------------------------------- prompts


def strip_answer_instruction(question: str) -> str:
    """Drop trailing short-answer instructions (repeatedly, so stacked ones all go), then strip."""
    question = question.strip()
    changed = True
    while changed:
        changed = False
        for instruction in ANSWER_INSTRUCTIONS:
            if question.endswith(instruction):
                question = question[: -len(instruction)].strip()
                changed = True
    return question


def normalize_options(options: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """Options as {letter: text}: a list becomes A, B, C, ...; dict keys must be single letters (each once, in any
    case); texts are strings or numbers, and blank ones are left out (their letters are not reused)."""
    if options is None:
        return {}
    if isinstance(options, Mapping):
        pairs = []
        for key, text in options.items():
            letter = str(key).strip().upper()
            if len(letter) != 1 or not "A" <= letter <= "Z":
                raise InputError(f"option keys must be single letters A-Z, got {key!r}")
            pairs.append((letter, text))
    elif isinstance(options, (str, bytes)) or not isinstance(options, Sequence):
        raise InputError(f"options must be a dict letter -> text or a list of texts, got {type(options).__name__}")
    elif len(options) > 26:
        raise InputError(f"at most 26 options are supported, got {len(options)}")
    else:
        pairs = [(chr(ord("A") + i), text) for i, text in enumerate(options)]
    seen = set()
    for letter, text in pairs:
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise InputError(f"option {letter} must be a string or a number, got {text!r:.80}")
        if letter in seen:  # {"A": ..., "a": ...}: the second replaced the first without a word
            raise InputError(f"option {letter} is given twice (keys are read in any case)")
        seen.add(letter)
    # A blank option is no option, as a TSV's blank cell (VLMEvalKit's missing value, which its prompts leave out):
    # "C. " was asked, and an answer "C" picked it.
    return {letter: str(text) for letter, text in pairs if str(text).strip()}


def options_text(options: Mapping[str, str]) -> str:
    """VLMEvalKit's option block: one "A. text" line per option, each ending in a newline."""
    return "".join(f"{key}. {text}\n" for key, text in options.items())


def build_cot_question(question: str, options: Mapping[str, str] | Sequence[str] | None = None) -> str:
    """The MPO chain-of-thought prompt: instruction stripped, options appended, wrapped, stripped.

    Options follow the question after a newline as "A. text" lines (`build_mpo_prompt`); image
    placeholders are left where they are (callers place them).
    """
    question = strip_answer_instruction(question)
    block = options_text(normalize_options(options))
    if block.strip():
        question = f"{question}\n{block}"
    return COT_INSTRUCTION.format(question=question).strip()


# ----------------------------------------------------------------------------- extraction


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of each outermost balanced \\boxed{...}, in order; an unclosed one ends the
    search."""
    boxes, start = [], text.find(_BOXED)
    while start >= 0:
        depth, i = 1, start + len(_BOXED)
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                boxes.append((start, j + 1, text[i:j]))
                break
        else:
            break
        start = text.find(_BOXED, j + 1)
    return boxes


def _unbox(text: str) -> str:
    """`text` with every \\boxed{x} replaced by x, nested ones too, to MAX_NESTING levels (a degenerate answer
    nesting a thousand raised RecursionError, and took quadratic time on the way)."""
    for _ in range(MAX_NESTING):
        boxes = _boxes(text)
        if not boxes:
            break
        pieces, at = [], 0
        for start, end, content in boxes:
            pieces += [text[at:start], content]
            at = end
        text = "".join(pieces) + text[at:]
    return text


def _clean(answer: str) -> str:
    return answer.strip().strip("*").strip()


def extract_final_answer(text: str, strict: bool = False) -> str | None:
    """The final answer stated in a response, or None when it states none.

    The rest of the line after the first "Final answer:" / "Answer:" / "答案:" (`strict`: the last, a "Final answer:"
    before a bare "Answer:", as the official `parse_answer` splits at it; markdown stars
    dropped; a \\boxed{} in it is unwrapped, and several different ones are unwrapped in place, so that
    "\\boxed{3} or \\boxed{4}" stays a hedge; a line that only opens display math, "$$" or "\\[",
    continues to its close), else the content of the last \\boxed{} (nested boxes unwrapped). `strict`
    adds the pair pipeline's format rules, as the official `parse_answer`: the trigger must be there (a box
    alone states no answer), reasoning must come before it, and it may appear at most twice.
    """
    match = _TRIGGER.search(text)
    if match and strict:
        # the official parse_answer splits at the last trigger (`rsplit`), and reads "Final answer:" (a bare
        # "answer:" in the reasoning, "to get the answer: count them", is no trigger there when one follows)
        matches = list(_TRIGGER.finditer(text))
        finals = [m for m in matches if not m.group(1).lower().startswith("answer")]
        match = (finals or matches)[-1]
    if match:
        trigger = match.group(1)
        if strict and (text.count(trigger) > 2 or not _clean(text[: match.start()])):
            return None
        answer = _clean(match.group(2))
        if answer in _DISPLAY_MATH:  # the line only opens display math: the answer is the math below
            close = text.find(_DISPLAY_MATH[answer], match.end())
            answer = _clean(text[match.end() : close]) if close >= 0 else ""
        contents = {_clean(_unbox(content)) for _, _, content in _boxes(answer)}
        if contents:  # one box: its content; different ones ("\\boxed{3} or \\boxed{4}"): the hedge as written
            answer = contents.pop() if len(contents) == 1 else _clean(_unbox(answer))
        return answer or None
    boxes = [] if strict else _boxes(text)
    if not boxes or not _clean(_unbox(boxes[-1][2])):
        return None
    return _clean(_unbox(boxes[-1][2]))


def states_answer(text: str) -> bool:
    """Whether a response has a "Final answer:" / "Answer:" / "答案:" trigger, whatever follows it (nothing, when
    the response was cut right after it)."""
    return _TRIGGER.search(text) is not None


# ----------------------------------------------------------------------------- parsing


def _simple(text: str) -> str:
    """NFKC, casefold, collapsed whitespace, surrounding punctuation removed (for option texts)."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text.strip(" .,:;!?'\"()[]*。，：；！？")


def parse_choice(text: str, options: Mapping[str, str] | Sequence[str] | None = None) -> str | None:
    """The option letter an answer picks, or None.

    In order: a bare letter ("B", "(b)", "B."); the text of exactly one option. Then a negated letter
    ("not A", "isn't B", "不是A") is dropped, an "A" right before another option's text is the article
    ("A cat" names option "cat"), and an answer that copies two or more options with their letters ("A.
    a dog B. a cat") picks none. Then: a letter stated as the answer ("The answer is B", "答案是C", the last one
    wins); a leading letter with a bracket or mark ("B) ...", "(B) ...", "B. ..."); a letter named otherwise
    ("option (C)", "选项C", the last one wins),
    none of the two when another letter follows it in a list ("A, B", "A or C"); VLMEvalKit's rule of one valid letter
    standing alone; the one option that is the answer's number ("2.0" names option "2"); else VLMEvalKit's rule
    of one option text contained (a numeric one not inside a longer number), in an answer at most twice as long as
    all option texts together (`can_infer_text`'s guard: "There is no cat in the picture, only a tree" picks no
    "cat"). Without options, letters A-N except I are valid.
    """
    opts = normalize_options(options)
    letters = set(opts) if opts else set(_LETTERS)
    text = unicodedata.normalize("NFKC", text).strip().strip("*").strip()
    answer_length = len(text)
    bare = _LETTER_ONLY.fullmatch(text)
    if bare and bare.group(1).upper() in letters:
        return bare.group(1).upper()
    same = [k for k, v in opts.items() if _simple(v) and _simple(v) == _simple(text)]
    if len(same) == 1:
        return same[0]
    text = _NEGATED_LETTER.sub(r"\1", text)
    for letter, option in opts.items():  # "A cat" names option "cat": that "A" is the article
        if letter != "A" and option.strip():
            text = re.sub(rf"(?<![A-Za-z])A(?=\s+(?i:{re.escape(option.strip())})(?![A-Za-z]))", "a", text)
    if len(_listed_options(text, opts)) > 1:  # the options list copied back
        return None
    stated = [m for m in _STATED_LETTER.finditer(text) if m.group(1) in letters]
    answered = [m for m in stated if _ANSWER_WORD.search(m.group(0))]  # "the answer is C" beats "(A) is wrong, ..."
    if answered:
        return _unless_listed(text, answered[-1].group(1), answered[-1].end(), letters)
    leading = _LEADING_LETTER.match(text)
    if leading and (leading.group(1) or leading.group(2)) in letters:
        group = 1 if leading.group(1) else 2
        return _unless_listed(text, leading.group(group), leading.end(group), letters)
    if stated:
        return _unless_listed(text, stated[-1].group(1), stated[-1].end(), letters)
    alone = {t for t in re.findall(r"[A-Za-z]+", text) if t in letters}
    if len(alone) == 1:
        return alone.pop()
    got = parse_number(text)
    if got is not None:  # "2.0" names option "2", "5 cm" option "5 cm" and not "5 m"
        unit = _unit(text)  # read once: a long answer against many options took seconds read for each
        same = [k for k, v in opts.items() if _same_number(got, unit, v)]
        if len(same) == 1:
            return same[0]
    if answer_length > 2 * sum(len(v) for v in opts.values()):  # can_infer_text's guard: a long answer
        return None  # that mentions one option ("there is no cat, only a tree") does not pick it
    lowered = text.casefold()
    contained = [k for k, v in opts.items() if v.strip() and _holds(lowered, v.strip().casefold())]
    return contained[0] if len(contained) == 1 else None


def _same_number(got: Number, unit: str | None, option: str) -> bool:
    """Whether an answer's number `got` (and `unit`) is the number of an option that holds one, as `check_answer`
    compares numbers (an option beyond the float range is none)."""
    target = parse_number(option)
    return target is not None and math.isfinite(target.value) and _numbers_agree(got, unit, target, _unit(option),
                                                                                 REL_TOL)


def _holds(text: str, option: str) -> bool:
    """Whether `option` is in `text`; one that starts or ends with a digit not inside a longer number (option "1" is
    not in "10", "1.5", "-1" or "1,000")."""
    before = r"(?<![\d.,\-\u2212])" if option[0].isdigit() else ""
    after = r"(?![.,]?\d)" if option[-1].isdigit() else ""
    return re.search(before + re.escape(option) + after, text) is not None


def _listed_options(text: str, options: Mapping[str, str]) -> list[str]:
    """Letters written with their own option text in `text` ("A. a dog", "(B) a cat")."""
    lowered = text.casefold()
    return [
        k for k, v in options.items()
        if v.strip() and re.search(rf"(?<![a-z])[(\[（]?{k.lower()}[)\]）.:：]\s*{re.escape(v.strip().casefold())}", lowered)
    ]


def _unless_listed(text: str, letter: str, end: int, letters: set[str]) -> str | None:
    """`letter` (ending at `end`), or None when another option letter follows it in a list ("A, B",
    "The answer is A or C"): an answer that names several options picks none (VLMEvalKit's `can_infer`
    infers no letter from it either)."""
    tail = _LETTER_LIST_TAIL.match(text, end)
    other = tail and (tail.group(1) or tail.group(2))
    return None if other in letters and other != letter else letter


def parse_yes_no(text: str) -> bool | None:
    """True for yes, False for no, None when neither or both is said.

    Chinese 是/对/正确/有/没错 and 否/不是/不对/错/没有 at the start (a hedge such as 可能, 无法确定 or
    不确定 there is neither); else a leading yes/no word, or a leading true/false/correct/incorrect one where the
    answer says neither yes nor no ("Correct answer: no." is a no); else `YOrN_Extraction`'s rule ("yes" without
    "no" or the reverse). A yes or no word negated ("not yes", "isn't true") is neither, and so is an answer that
    hedges (`_HEDGE`: "no idea", "not sure") where it does not start with yes or no."""
    s = unicodedata.normalize("NFKC", text).strip().strip("*").strip().casefold()
    if s.startswith(_CN_HEDGES):
        return None
    if s.startswith(_CN_NOT_WRONG):
        return True
    if s.startswith(_CN_NO):
        return False
    if s.startswith(_CN_YES):
        return True
    words = re.findall(r"[a-z]+", s)
    if not (words and words[0] in _YES | _NO):  # "No, that isn't true" is a no
        if any(a in ("not", "t") and b in _YES | _NO for a, b in itertools.pairwise(words)):  # "not yes", "isn't true"
            return None
        hedge = _HEDGE.search(s.replace("\u2019", "'"))
        if hedge and _HEDGER.search(s.replace("\u2019", "'"), 0, hedge.start()):
            return None
    elif _HEDGE.match(s):  # "No idea", "No clue"
        return None
    said_yes, said_no = "yes" in words, "no" in words
    if said_yes and said_no:
        return None
    if words and words[0] in _YES | _NO:
        if words[0] in _VERDICTS and said_yes != said_no:  # "Correct answer: no." says no, as YOrN_Extraction reads it
            return said_yes
        return words[0] in _YES
    return True if said_yes else False if said_no else None


def _fractions(text: str) -> str:
    """\\frac{a}{b} as (a)/(b), innermost first."""

    def slash(m: re.Match) -> str:
        numerator = m[1] if m[1] is not None else m[2]
        denominator = m[3] if m[3] is not None else m[4]
        return f"({numerator})/({denominator})"

    return _repeat(_FRAC, slash, text)


def _powers(text: str) -> str:
    """Superscript digits and signs as ^digits ("10⁵" -> "10^5"): NFKC would make "10⁵" the number 105."""
    return re.sub(f"[{_SUPERSCRIPTS}]+", lambda m: "^" + m[0].translate(_FROM_SUPERSCRIPT), text)


def _numeric_text(text: str) -> str:
    """Text with LaTeX wrappers, unicode minus, en dash and "minus"/"negative"/负 before a number,
    thousands commas, magnitude words ("1.2 million" -> "1.2e6"), Chinese numerals, \\frac{a}{b}, ^\\circ as
    °, vulgar fractions ("½"; "3½" is two numbers, as "3 1/2") and a x 10^b made plain."""
    s = _powers(text)  # before NFKC
    # LaTeX's comma "{,}" is a decimal one before other than three digits or after a lone 0 ("12{,}5",
    # "0{,}125": no thousands group); else, as "\\,", a group separator: "1{,}234" as a comma, "1\\,234" as a
    # thin space (`_GROUPED` reads them)
    s = re.sub(r"(?<=\d)\{,\}(?=\d)(?!\d{3}(?!\d))|(?<=0)(?<![\d.]0)\{,\}(?=\d)", ".", s)
    s = re.sub(r"(?<=\d)(?:\{,\}|\\,)(?=\d)", lambda m: "," if m[0] == "{,}" else "\u2009", s)
    s = _GROUPED.sub(_ungroup, s.translate(_ARABIC_SEPARATORS))  # before NFKC makes no-break spaces plain
    s = re.sub(f"(?<=\\d)(?=[{_VULGAR_FRACTIONS}]|\\\\[dt]?frac)", " ", s)  # "3½", "1\\frac{1}{2}": two numbers
    s = unicodedata.normalize("NFKC", s).translate(_DASH_MINUS).replace("\u2044", "/")  # NFKC: "½" is "1⁄2"
    s = _THOUSANDS_COMMAS.sub(lambda m: m[0].replace(",", ""), s)
    # magnitudes after commas and LaTeX wrappers ("1,200 million", "1.2\\text{ million}") and before Chinese
    # numerals ("3十万" is 3e5, not 3 before 十万)
    s = _fractions(_chinese_numerals(_magnitudes(_TEXT_WRAPPER.sub(r" \1 ", s))))
    s = _MINUS_WORD.sub("-", s)
    s = re.sub(r"(\d)\s*(?:[×x*·]|\\times|\\cdot)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?", r"\1e\2", s)
    s = re.sub(r"(?<![\d.])10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?", r"1e\1", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "°", s)  # 30^\circ
    s = s.replace("\\approx", "≈").replace("\\%", "%").replace("\\$", "$")
    # "-$5" is -5, not "- 5"; a dash with a space after it is no minus ("Sales – $50", a bullet "- $5")
    s = re.sub(r"(?<![\w.)])-([$€£¥])\s*(?=\.?\d)", r"\1-", s).replace("$", " ")
    # \\left( is "(": a space there parted a minus from its bracket ("-\\left(\\frac{1}{2}\\right)" read as 0.5)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[,;!: ]", " ", s)
    # "(3)" as 3 and "(1/2)" as 1/2, so that a minus before the bracket stays ("-(1/2)" is -0.5, not 0.5), but not a
    # number in brackets beside another ("2(3)", "(2)(3)": two numbers, not 23)
    return _repeat(r"(?<![\d.)])\((-?[\d.]+(?:\s*/\s*[\d.]+)?)\)(?![\d(])", r"\1", s)  # "((1)/(2))": inside out


def _ungroup(m: re.Match) -> str:
    """A `_GROUPED` number written plain: its group separator (the first sign in it) dropped, a decimal
    comma made a point ("1.234,5" -> "1234.5", "1,00,000" -> "100000")."""
    separator = re.search(r"\D", m[0])[0]
    return m[0].replace(separator, "").replace(",", ".")


def _magnitudes(text: str) -> str:
    """Numbers times magnitude words (`_MAGNITUDE`) in scientific notation: "1.2 million" -> "1.2e6",
    "3 hundred thousand" -> "3e5", "1.5万亿" -> "1.5e12"."""

    def exponent(m: re.Match) -> str:
        return f"{m[1]}e{_exponent(m[2])}"

    return _MAGNITUDE.sub(exponent, _MAGNITUDE_CHAIN.sub(_magnitude_sum, text))


def _exponent(words: str) -> int:
    """The power of ten of magnitude words: "hundred thousand" is 5, "万亿" 12."""
    return sum(_MAGNITUDES[word.removesuffix("s")] for word in re.findall(r"[a-z]+|\S", words.casefold()))


def _magnitude_sum(m: re.Match) -> str:
    """A `_MAGNITUDE_CHAIN` as its sum ("3 thousand 5 hundred" -> "3500") where every term is below the
    power of ten before it (integers after the first) and the first below 10^31, else unchanged ("2
    thousand 3 thousand")."""
    terms = [(t[1], _exponent(t[2])) for t in _MAGNITUDE_TERM.finditer(m[0])]
    if m[1] is not None:
        terms.append((m[1], 0))
    if len(terms) < 2 or terms[0][1] > 30:  # "1 million million ..." is no sum to write out
        return m[0]
    total = Fraction(terms[0][0]) * 10 ** terms[0][1]
    for (_, above), (digits, power) in zip(terms, terms[1:]):
        if not digits.isdigit() or int(digits) * 10**power >= 10**above:
            return m[0]
        total += int(digits) * 10**power
    return str(total.numerator) if total.denominator == 1 else str(float(total))


def _chinese_integer(run: str) -> int | None:
    """The value of a Chinese numeral ("二十五", "一百零五", "一万两千"), or None for a run that is none
    ("三四", a range; "二〇二〇", digit by digit; "百" without a digit)."""
    total = section = 0
    digit, unit_before = None, None
    for ch in run:
        if ch in _CN_DIGITS:
            if digit:  # a digit right after a digit other than 零: "三四"
                return None
            digit = _CN_DIGITS[ch]
        elif ch in _CN_UNITS:
            unit = _CN_UNITS[ch]
            if unit_before is not None and unit >= unit_before:
                return None
            if digit is None:
                if ch != "十" or section or total:  # only a leading 十 may stand without a digit: 十二
                    return None
                digit = 1
            section += digit * unit
            digit, unit_before = None, unit
        else:
            section += digit or 0
            if not section:
                return None
            total += section * _CN_SECTIONS[ch]
            section, digit, unit_before = 0, None, None
    return total + section + (digit or 0)


def _chinese_numerals(text: str) -> str:
    """Chinese numerals that stand as numbers (see `_CN_BEFORE`) written in digits: "答案是三" -> "答案是3",
    "三分之一" -> "(1)/(3)", "百分之五十" -> "50%", "三点五万" -> "3.5e4"."""

    def stands_apart(ch: str, words: str) -> bool:
        return not ch or ch in words or not _is_cjk(ch) or unicodedata.category(ch).startswith("P")

    def digits(m: re.Match) -> str:
        before, after = m.string[m.start() - 1 : m.start()], m.string[m.end() : m.end() + 1]
        value = _chinese_integer(m.group(2))
        if value is None or not (stands_apart(before, _CN_BEFORE) and stands_apart(after, _CN_MEASURES)):
            return m[0]
        number = str(value)
        if m.group(3):  # decimals and a magnitude: "三点五万"
            number += "." + "".join(str(_CN_DIGITS[ch]) for ch in m.group(3))
            number += f"e{sum(_MAGNITUDES[ch] for ch in m.group(4))}" if m.group(4) else ""
        if m.group(1) is None:
            return number
        if m.group(1) == "百":
            return f"{number}%"
        denominator = _chinese_integer(m.group(1))
        return m[0] if denominator is None else f"({number})/({denominator})"

    return _CN_NUMERAL.sub(digits, text)


def _is_count(match: re.Match) -> bool:
    """Whether a number word found by `_NUMBER_WORD` counts something.

    Never in a compound ("two-thirds") or right after a word of `_NOT_A_COUNT_AFTER` ("the other
    two", "not one"); "no" only before a noun ("no green shapes", not "no idea", "No it is not").
    "one" is also the pronoun for a thing already named ("the big red one"), so it counts only where
    it starts the answer or a clause ("One.", "Final answer: one", "One of them is red"), follows a
    word of `_COUNT_AFTER` ("there is one", "only one of them") or goes with a noun ("ate one
    apple"; that noun is singular, so a word in -s there is a verb: "the red one looks bigger").
    """
    word = match.group(0).casefold()
    before, after = match.string[: match.start()], match.string[match.end() :]
    if re.search(r"[A-Za-z]-$", before) or re.match(r"-[A-Za-z]", after):
        return False
    clause = re.split(r"[^\w\s']", before.replace("\u2019", "'"))[-1]
    words = re.findall(r"[\w']+", clause.casefold())
    previous = words[-1] if words else None
    if previous in _NOT_A_COUNT_AFTER:
        return False
    following = re.match(r"\s+([\w']+)", after)
    following = following.group(1).casefold() if following else None
    noun_follows = following is not None and following not in _NOT_A_NOUN
    if word == "no":
        return noun_follows and following not in _HEDGES_AFTER_NO
    if word != "one":
        return True
    if previous in _MAGNITUDES or (previous == "and" and len(words) > 1 and words[-2] in _MAGNITUDES):
        return True  # the last term of a number: "two hundred and one", "one thousand one"
    if previous in ("minus", "negative"):
        return True
    singular_noun_follows = noun_follows and not re.search(r"[^su]s$", following)
    return previous is None or previous in _COUNT_AFTER or singular_noun_follows


def _root(m: re.Match) -> str:
    """A root found by `_ROOT_OF_DIGITS` as its whole-number value ("∛8" -> "2"), else as written."""
    degree = _ROOTS.index(m[1]) + 2 if m[1] else int(m[2] or 2)
    digits = m[3] or m[4]
    if degree < 2 or (not m[1] and not m[3] and len(digits) > 1):  # LaTeX reads \\sqrt16 as √1 before 6
        return m[0]
    radicand = int(digits)
    if radicand < 0 and degree % 2 == 0:  # √-4: no real number
        return m[0]
    value = round(abs(radicand) ** (1 / degree))
    return str(value if radicand >= 0 else -value) if value**degree == abs(radicand) else m[0]


def _number_part(text: str) -> str:
    """`_numeric_text` of the part after the last "=" or "≈": where an answer's number is read; all of it
    where a list's separator comes between two of them ("x=3, y=4" gives two values, not 4). A number before a
    clause that states a given ("12 cm, given that r = 6 cm", "x = 5 (where y = 3)") is the answer, not the
    given's value after it."""
    s = _numeric_text(text)
    parts = re.split("[=≈]", s)
    if len(parts) > 1:  # the given is the last "=" ("Step 2: since x = 4, y = 8" opens no given before y)
        clause = _GIVEN_CLAUSE.search(parts[-2])
        if clause and len({m[0] for m in _NUMBER_RE.finditer(parts[-2], 0, clause.start())}) == 1:  # not "12 - 4 ("
            return parts[-2][: clause.start()]
    return s if any(re.search(r"[,;、]|\band\b", part) for part in parts[1:-1]) else parts[-1]


def parse_number(text: str) -> Number | None:
    """The number an answer gives; None when it gives none, or several different ones ("2 or 3").

    Only the text after the last "=" or "≈" counts (the decimal of "2√3 ≈ 3.46"), and it gives no number
    when it holds a root, pi or a power of a number ("4√3", "3\\pi", "2^3"; the root of a perfect power
    standing alone is its value: "∛8" is 2, "\\sqrt{9}" 3), or a number stated as a
    bound or negated ("more than 5", "not 5", "5 or more", "5+", "至少5个": `_BOUND_BEFORE`,
    `_BOUND_AFTER`). Fractions a/b are computed, a following % or "percent" marks a percentage (a
    percentage beside its fraction, "50% (0.5)", is one number), and digits inside words and units
    ("CO2", "cm^2") are no numbers. Chinese numerals count where they stand apart (`_chinese_numerals`:
    "答案是三", "三只", "百分之五十" is 50%, "三点五" 3.5), magnitude words multiply ("1.2 million", "3万",
    "2.5亿": `_MAGNITUDE`) and falling English ones add up ("3 thousand 5 hundred": `_MAGNITUDE_CHAIN`). In answers of at most five words, number words that count something
    count as digits, as the VQA normaliser maps them ("three", "there is one", "none"), and so does "no"
    before a word ("no green shapes": 0; "I see no 3" gives two numbers). They do not count where they
    pick something out or negate ("the other two", "not one"), in a compound ("two-thirds") or as "no
    idea", and "one" counts only where it starts the answer, follows a counting word or goes with a noun
    ("there is one", "only one of them", "one apple"; not "the one on the left", "the big red one"): see
    `_is_count`.
    """
    s = _ROOT_OF_DIGITS.sub(_root, _number_part(text))
    if _EXPRESSION.search(s):
        return None
    if len(re.findall(r"\w+", s)) <= _SHORT_ANSWER_WORDS:
        # "no", the one match missing from _WORD_NUMBERS, is 0; "two thousand" is 2000, "a hundred and five" 105
        s = _TENS_AND_UNIT.sub(lambda m: str(_WORD_NUMBERS[m[1].casefold()] + _WORD_NUMBERS[m[2].casefold()]), s)
        s = _NUMBER_WORD.sub(lambda m: str(_WORD_NUMBERS.get(m[0].casefold(), 0)) if _is_count(m) else m[0], s)
        s = _MINUS_WORD.sub("-", _magnitudes(_A_MAGNITUDE.sub("1 ", s)))
    s = _AND_A_PART.sub(lambda m: str(int(m[1]) + (0.5 if m[2].casefold() == "half" else 0.25)), s)
    numbers = set()
    for match in _NUMBER_RE.finditer(s):
        # the bound's words within a few dozen characters before the number: searching all the text
        # before every number took seconds on a long degenerate answer ("5 5 5 ..."), quadratic time
        if _BOUND_BEFORE.search(s, max(0, match.start() - 64), match.start()) or _BOUND_AFTER.match(s, match.end()):
            return None
        if _PART_AFTER.match(s, match.end()):  # "2 thirds", "3 dozen": not 2, 3
            return None
        value = float(match.group(1))
        if match.group(2) is not None:
            denominator = float(match.group(2))
            if denominator == 0:
                return None
            value /= denominator
        exact = None  # below 2**53 floats hold the number well enough: compared as before
        if math.isfinite(value) and abs(value) >= EXACT_FLOAT_INTEGERS:
            exact = _exact(match.group(1))
            if match.group(2) is not None and exact is not None:
                divisor = _exact(match.group(2))
                exact = exact / divisor if divisor else None
        percent = bool(match.group(3)) or bool(_PERCENT_WORD.match(s, match.end()))
        numbers.add(Number(value, percent, exact))
    # "50% (0.5)": a percentage beside its fraction is one number
    plain = [n.value for n in numbers if not n.percent]
    numbers = {n for n in numbers if not (n.percent and any(_close(n.value / 100, v, 1e-9) for v in plain))}
    return numbers.pop() if len(numbers) == 1 else None


def _unit(text: str) -> str | None:
    """The known unit (`_UNIT_NAMES`) written right after the first number, of the answer's part after
    the last "=" or "≈", that has one ("5 centimeters" -> "cm", "30° C" -> "°C", "30 degrees" -> "°", "3 m/s" ->
    "m"), or None."""
    s = _number_part(text)
    for match in _NUMBER_RE.finditer(s):
        word = _UNIT_WORD.match(s, match.end())
        if word:
            name = word.group(1).casefold()
            unit = _UNITS.get(name) or (_UNITS.get(name[:-1]) if len(name) > 2 and name.endswith("s") else None)
            if unit == "°" and (scale := _DEGREE_SCALE.match(s, word.end())):
                return "°" + scale.group(1)[0].upper()
            if unit:
                return unit
    return None


def _same_unit(a: str, b: str) -> bool:
    """Whether two units of `_unit` agree: equal, or a degree without its scale beside one with it."""
    return a == b or {a, b} <= {"°", "°C", "°F"} and "°" in (a, b)


def _is_cjk(ch: str) -> bool:
    return bool(re.match(f"[{_CJK}]", ch))


def normalize_text(text: str) -> str:
    """Short-answer normal form: NFKC, LaTeX text wrappers unwrapped ("\\text{Paris}", "\\textbf{..}",
    "\\mathrm{..}"), casefold, punctuation and LaTeX's inline math `$` to spaces
    (decimal points and minus signs kept), thousands commas dropped, English articles dropped (unless they are all
    there is), number words as digits, single spaces and no space next to a CJK character."""
    s = _TEXT_WRAPPER.sub(r" \1 ", unicodedata.normalize("NFKC", text)).casefold().replace("$", " ")
    s = _THOUSANDS_COMMAS.sub(lambda m: m[0].replace(",", ""), s.translate(_DASH_MINUS))
    s = _TENS_AND_UNIT.sub(lambda m: str(_WORD_NUMBERS[m[1]] + _WORD_NUMBERS[m[2]]), s)
    chars = []
    for i, ch in enumerate(s):
        decimal = ch == "." and 0 < i < len(s) - 1 and s[i - 1].isdigit() and s[i + 1].isdigit()
        # a minus sign (before a number, not after a letter or digit: "(-2, 3)", "x = -2") is kept: "(2, 3)" is
        # another answer; a hyphen goes as other punctuation does ("well-known", "2-3")
        sign = ch == "-" and s[i + 1 : i + 2].isdigit() and not s[:i].rstrip()[-1:].isalnum()  # not "10 -20"
        # a period between two letters joins them, as the official TextVQA normaliser strips it: "U.S.A." is "usa"
        # (not "u s a", whose "a" went as an article), "a.m." is "am"
        if ch == "." and s[i - 1 : i].isalpha() and s[i + 1 : i + 2].isalpha():
            continue
        chars.append(" " if unicodedata.category(ch).startswith("P") and not (decimal or sign) else ch)
    words = _SPACED_OPERATOR.sub(r"\1", "".join(chars)).split()
    # articles go, unless they are the whole answer (a ground truth "a": the letter)
    words = [str(_WORD_NUMBERS.get(w, w)) for w in words if w not in _ARTICLES] or words
    out = ""
    for word in words:
        if out and not (_is_cjk(out[-1]) or _is_cjk(word[0])):
            out += " "
        out += word
    return out


# Passes of `_repeat`, one per level of nesting: deeper nesting stays as written (each pass reads the
# whole answer, so a degenerate answer nesting thousands of levels would take quadratic time).
MAX_NESTING = 32


def _repeat(pattern: str | re.Pattern, replacement: str | Callable[[re.Match], str], s: str) -> str:
    """`re.sub` until nothing changes (innermost first for nested braces), at most MAX_NESTING times."""
    for _ in range(MAX_NESTING):
        s, n = re.subn(pattern, replacement, s)
        if not n:
            break
    return s


def _root_sign(degree: str | None) -> str:
    """√, ∛ or ∜ for a root of degree 2 (also None), 3 or 4; √[n] for others."""
    degree = degree or "2"
    return _ROOTS[int(degree) - 2] if degree in ("2", "3", "4") else f"√[{degree}]"


def normalize_math(text: str) -> str:
    """Math normal form of an answer holding a root or pi, for a text ground truth that holds one.

    The text after the last "=" and before a "≈" (the exact form of "2√3 ≈ 3.46"); \\sqrt{x}, \\sqrt2,
    sqrt(x) and √(x) as √x (brackets kept around more than one term: √(x+1)), \\sqrt[3]{x}, cbrt(x) and ∛x
    as ∛x (\\sqrt[4] as ∜, others as √[n]); \\pi and the word pi as π;
    \\frac{a}{b} (also \\dfrac, \\tfrac) as a/b; an explicit product sign before √ or π dropped (2 * √3
    is 2√3); inline math, \\left/\\right, spacing commands, math brackets \\( \\) \\[ \\], \\text{..}
    units, a trailing unit word, a final period and all whitespace dropped; casefolded. Written forms
    only: no algebra (√8 is not 2√2, 1+√2 is not √2+1).
    """
    s = _powers(text)
    s = unicodedata.normalize("NFKC", s).translate(_DASH_MINUS).replace("$", " ")
    s = re.sub(r"\\[()\[\]]", " ", s).replace("\\approx", "≈").rsplit("=", 1)[-1].split("≈")[0]
    s = re.sub(r"\\pi(?![A-Za-z])|(?<![A-Za-z])pi(?![A-Za-z])", "π", s, flags=re.IGNORECASE)
    s = re.sub(r"\\(?:text|mathrm|mbox)\{[^{}]*\}(?:\^\{?\d\}?)?", " ", s)
    s = re.sub(r"(?<=[\d)}π])\s+[A-Za-z]{1,6}(?:\^\{?\d\}?)?\s*\.?$", "", s.strip())  # "4π cm²"
    s = _repeat(r"\\sqrt(?:\s*\[\s*(\d+)\s*\])?\s*\{([^{}]*)\}", lambda m: f"{_root_sign(m[1])}({m[2]})", s)
    s = re.sub(r"\\sqrt(?:\s*\[\s*(\d+)\s*\])?\s*(\d|[A-Za-z](?![A-Za-z]))", lambda m: _root_sign(m[1]) + m[2], s)
    s = re.sub(r"(?<![A-Za-z])(sqrt|cbrt)\s*\(", lambda m: _root_sign("3" if m[1] == "cbrt" else None) + "(", s)
    s = _fractions(s)
    s = re.sub(r"\\(?:left|right|[,;:! ])", "", s).replace("{", "(").replace("}", ")")
    s = re.sub(r"\s+", "", s).casefold().rstrip(".")
    s = re.sub(rf"(?:\*|\\cdot|\\times|×|·)(?=[{_ROOTS}π])", "", s)
    # Brackets that change nothing go: around one number or name after √ or ^ (√(3) is √3, x^{2} is x^2,
    # √(2π) stays), around one term after "/" ((√3)/(2) is √3/2, 1/(2π) stays), around a product
    # elsewhere ((2√3)/3 is 2√3/3); never before a power or next to another factor (2(3), (2π)^2 stay).
    end = rf"(?![\w.({_ROOTS}π^])"
    s = _repeat(rf"([{_ROOTS}^])\((-?[0-9a-z.]+)\){end}", r"\1\2", s)
    s = _repeat(rf"/\(([{_ROOTS}]?[0-9a-z.]+|π)\){end}", r"/\1", s)
    return _repeat(rf"(?<![\w.)/^{_ROOTS}])\((-?[0-9a-z.{_ROOTS}π]+)\){end}", r"\1", s)


# ----------------------------------------------------------------------------- checking


def infer_kind(ground_truth: str, options: Mapping[str, str] | Sequence[str] | None = None) -> str:
    """choice (options given, or a bare letter A-N except I), yesno, number (a number with at most a
    unit or a Chinese measure word: "12 cm", "三只"), else text."""
    if options:
        return "choice"
    gt = ground_truth.strip()
    if re.fullmatch(rf"[(\[]?[{_LETTERS}][)\]]?\.?", gt):
        return "choice"
    if _simple(gt) in _YES | _NO | {"是", "否", "对", "不对", "不是", "有", "没有"}:
        return "yesno"
    if _UNIT_ONLY.fullmatch(_numeric_text(gt)):
        return "number"
    return "text"


def _ground_truth_letter(ground_truth: str, options: dict[str, str]) -> str:
    letters = set(options) if options else set(_LETTERS)
    bare = _LETTER_ONLY.fullmatch(ground_truth.strip())
    if bare and bare.group(1).upper() in letters:
        return bare.group(1).upper()
    same = [k for k, v in options.items() if _simple(v) == _simple(ground_truth)]
    if len(same) == 1:
        return same[0]
    raise InputError(
        f"ground truth {ground_truth!r} is neither an option letter nor the text of one option; give the options, "
        'or "kind": "text" to compare it as text'
    )


def _close(a: float, b: float, rel_tol: float) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)


def _numbers_agree(got: Number, got_unit: str | None, target: Number, target_unit: str | None, rel_tol: float) -> bool:
    """Whether a number read from an answer is the ground truth's: units that both name agree, integer ground truths
    exactly and others within `rel_tol`, a percentage also as its fraction."""
    if None not in (got_unit, target_unit) and not _same_unit(got_unit, target_unit):
        return False
    tol = 0.0 if target.value.is_integer() else rel_tol
    if tol == 0 and got.percent == target.percent and None not in (got.exact, target.exact):
        # past 2**53 float() rounds integers to their neighbours: 123456789012345679 was read as ...678
        return got.exact == target.exact
    if _close(got.value, target.value, tol):
        return True
    if got.percent != target.percent:
        return _close(got.value / 100, target.value, tol) or _close(got.value, target.value / 100, tol)
    return False


def check_answer(
    prediction: str | None,
    ground_truth: str,
    kind: str | None = None,
    options: Mapping[str, str] | Sequence[str] | None = None,
    rel_tol: float = REL_TOL,
) -> bool | None:
    """Whether an extracted answer matches the ground truth; None when it cannot be read as `kind`.

    kind: "choice", "number", "yesno" or "text"; inferred from the ground truth and options when None.
    Numbers match within `rel_tol` (relative), integer ground truths exactly (a count or a year one
    off is wrong); a percentage also matches its fraction (25% ~ 0.25); a unit on both sides must be
    the same when both are known (`_UNIT_NAMES`: "5 m" is not "5 cm", "5 centimeters" is). A text
    ground truth holding a root or pi is compared in `normalize_math` form.
    """
    # a boxed ground truth ("\\boxed{5}") is its content, as every extracted answer is unboxed: else nothing matches it
    ground_truth = _clean(_unbox(ground_truth)) or ground_truth
    if kind is None:
        kind = infer_kind(ground_truth, options)
    if kind not in KINDS:
        raise InputError(f"unknown answer kind {kind!r}; known: {', '.join(KINDS)}")
    if prediction is None or not prediction.strip():
        return None
    if kind == "choice":
        opts = normalize_options(options)
        want = _ground_truth_letter(ground_truth, opts)
        got = parse_choice(prediction, opts or None)
        return None if got is None else got == want
    if kind == "yesno":
        want = parse_yes_no(ground_truth)
        if want is None:
            raise InputError(f"ground truth {ground_truth!r} is neither yes nor no")
        got = parse_yes_no(prediction)
        return None if got is None else got == want
    if kind == "number":
        target = parse_number(ground_truth)
        if target is None:
            raise InputError(f"ground truth {ground_truth!r} holds no number, or several")
        if not math.isfinite(target.value):  # float() reads 10^400 and 10^500 as the same infinity
            raise InputError(f"ground truth {ground_truth!r} is beyond the range of a float (about 1.8e308)")
        got = parse_number(prediction)
        if got is None:
            return None
        return _numbers_agree(got, _unit(prediction), target, _unit(ground_truth), rel_tol)
    if _MATH_MARK.search(unicodedata.normalize("NFKC", ground_truth)):
        got_math = normalize_math(prediction)
        return got_math == normalize_math(ground_truth) if got_math else None
    got_text = normalize_text(prediction)
    if not got_text:
        return None
    return got_text == normalize_text(ground_truth)
