"""Stand-in for Forge's modules/infotext_utils.py: the quoting that create_infotext applies to every value."""

import json


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)
