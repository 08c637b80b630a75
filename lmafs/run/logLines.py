"""The lines of the training log that are read back, each written and parsed from one template: runOutputs.py formats
them, plotting.parseLog parses them (for the plots, compareAfs.py and bench/gpuCheck.py), so that a changed line
cannot silently stop being parsed. The formats are the original's (SPEC §6), whose logs parse too."""
import re
import string

NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"


class Line:
    """A log line: a str.format template, and the parser of lines it wrote. In the parser the template's literal
    text matches with any whitespace where it has spaces; a field with a float spec (.4f) is a number, with an int
    spec (d, or a thousands separator: ,) an integer, and without one the text up to what follows (or the rest of the
    line); patterns: a field's own regular expression instead. optionalFrom: a field that, with the text before it
    and the rest of the template, may be missing in a line (an older log's shorter form). Lines may start with
    whitespace."""

    def __init__(self, template, optionalFrom=None, **patterns):
        self.template = template
        self.converters = {}
        parts = []
        pieces = list(string.Formatter().parse(template))
        for index, (literal, field, spec, _) in enumerate(pieces):
            parts.append(re.sub(r"(\\ )+", r"\\s+", re.escape(literal)))
            if field is None:
                continue
            last = index == len(pieces) - 1  # no literal text after it
            if field in patterns:
                pattern, convert = patterns[field], str
            elif spec and spec[-1] in "fge%":
                pattern, convert = NUMBER, float
            elif spec and (spec[-1] == "d" or spec[-1] == ","):
                pattern, convert = r"[\d,]+", lambda text: int(text.replace(",", ""))
            else:
                pattern, convert = ".*" if last else ".*?", str
            self.converters[field] = convert
            parts.append(f"(?P<{field}>{pattern})")
        regex = "".join(parts)
        if optionalFrom is not None:
            cut = "".join(parts[:self.partIndex(pieces, optionalFrom)])
            regex = cut + "(?:" + regex[len(cut):] + ")?"
        self.regex = re.compile(r"^\s*" + regex)

    @staticmethod
    def partIndex(pieces, optionalFrom):
        """The index into the parser's parts (a literal, then its field, per piece) of the literal before the field
        optionalFrom."""
        for index, (_, field, _, _) in enumerate(pieces):
            if field == optionalFrom:
                return 2 * index
        raise ValueError(f"the template has no field {optionalFrom!r}")

    def format(self, **values):
        return self.template.format(**values)

    def parse(self, line):
        """{field: value} of a line this template wrote (fields of a missing optional part: None), or None."""
        match = self.regex.match(line)
        if match is None:
            return None
        return {name: None if value is None else self.converters[name](value)
                for name, value in match.groupdict().items()}


STEP = "Step {step:d}/{nSteps:d}   "  # a step line describes the model after its step-th update

VALIDATION = Line(STEP + "lossVa {loss:.4f}   accVa {accuracy:.1f}")
BITS_PER_BYTE = Line(STEP + "bpbVa {bpb:.4f}")
TRAINING = Line(STEP + "lossTr {loss:.4f}   accTr {accuracy:.1f}   {seconds:.0f}s = {secondsPerStep:.2f}s/step",
                optionalFrom="seconds")  # model 0's, over the report window
MODEL_TRAINING = Line(STEP + "model {model:d}   lossTr {loss:.4f}   accTr {accuracy:.1f}")
ACTIVATIONS = Line(STEP + "Activation magnitudes ({kind:d}): {values}")  # kind 2: mean |x|, 3: max |x|
PEAK_MEMORY = Line(STEP + "Peak CUDA memory usage: {gigabytes:.3f} GB")

HYPERPARAMETER = Line("  {name} = {value}", name=r"\w+")
PARAMETER = Line("  {name:40s} {shape:20s} {count:>12,} {state}{shared}", name=r"\S+", shape=r"\([\d, ]*\)",
                 state="trainable|frozen")
PARAMETER_TOTALS = Line("Parameters per model: {trainable:,} trainable, {frozen:,} frozen, {total:,} total")
VOCABULARY = Line("Vocabulary size: {size:,} ({source})", optionalFrom="source")  # the original's has no (source)
MODELS_PER_PASS = Line("Phase I: {nModels:d} models, start steps {starts}; {modelsPerPass:d} models per pass ({why})",
                       starts=r"\[[\d, ]*\]")
KERNEL_PREFIXES = ("Spline kernels:", "Attention:", "Attention weights:", "Compiled before step 1")
FALLBACK_PREFIX = "FlexAttention failed"  # the trainer's line when it switches to SDPA
