package org.edgegemma.core

import java.math.BigInteger

/**
 * Gemma 4's answer format, read back: the thinking channel, tool calls and the visible answer.
 *
 * A line-by-line port of `parse_response` / `parse_arguments` in `edge_gemma/chat.py` (the Python side is the
 * reference; `tests/test_android_demo.py` feeds the same model outputs to both and compares the structures).
 * The model writes tool calls as `<|tool_call>call:NAME{key:value,...}<tool_call|>`, strings wrapped in `<|"|>`,
 * keys bare; the arguments are read by recursive descent, not by a regex-to-JSON rewrite, because a rewrite breaks
 * on strings that contain `,key:`.
 */
object GemmaFormat {
    const val ESCAPE = "<|\"|>"
    const val CHANNEL_START = "<|channel>"
    const val CHANNEL_END = "<channel|>"
    const val TOOL_CALL_START = "<|tool_call>"
    const val TOOL_CALL_END = "<tool_call|>"
    const val TOOL_RESPONSE_START = "<|tool_response>"
    const val TURN_END = "<turn|>"
    const val EOS = "<eos>"

    /** Strings after which the turn is over (Python: the cut in `parse_response`). */
    val STOP_STRINGS = listOf(TURN_END, TOOL_RESPONSE_START)
}

/** One parsed call: the function name and its arguments as JSON-like values (see [Json] for the types). */
data class ToolCall(val name: String, val arguments: Map<String, Any?>) {
    fun toJson(): Map<String, Any?> = linkedMapOf("name" to name, "arguments" to arguments)
}

/** The model's turn split into the visible answer, the thinking channel (null when none) and the tool calls. */
data class ParsedResponse(val answer: String, val thinking: String?, val toolCalls: List<ToolCall>) {
    fun toJson(): Map<String, Any?> =
        linkedMapOf("answer" to answer, "thinking" to thinking, "tool_calls" to toolCalls.map { it.toJson() })
}

/** A `<|tool_call>` block the model wrote cannot be read; the message says where and why. */
class ToolCallParseException(message: String) : IllegalArgumentException(message)

object ToolCallParser {
    // Python's `\s` is Unicode-aware; (?U) makes Java's the same.
    private val CALL_RE = Regex("(?s)" + Regex.escape(GemmaFormat.TOOL_CALL_START) + "(.*?)" + Regex.escape(GemmaFormat.TOOL_CALL_END))
    private val CALL_HEAD_RE = Regex("(?sU)\\s*call:([^{\\s]+)\\s*(\\{.*\\})\\s*")
    private val CHANNEL_RE = Regex(
        "(?s)" + Regex.escape(GemmaFormat.CHANNEL_START) + "(.*?)(?:" + Regex.escape(GemmaFormat.CHANNEL_END) + "|\\z)",
    )

    /**
     * Split a decoded turn (special tokens kept as text) into answer, thinking and tool calls.
     *
     * Text after `<turn|>` or `<|tool_response>` is dropped, as are `<eos>`. Thinking is every `<|channel>...<channel|>`
     * block (an unterminated one runs to the end) without its `thought\n` channel name. Tool calls are parsed in order
     * and removed from the answer; a `<|tool_call>` without its end is an error.
     */
    fun parseResponse(raw: String): ParsedResponse {
        var text = raw
        for (stop in GemmaFormat.STOP_STRINGS) {
            val cut = text.indexOf(stop)
            if (cut >= 0) text = text.substring(0, cut)
        }
        text = text.replace(GemmaFormat.EOS, "")
        val thoughts = ArrayList<String>()
        for (m in CHANNEL_RE.findAll(text)) {
            var body = m.groupValues[1]
            if (body.startsWith("thought")) {
                body = body.substring("thought".length)
                if (body.startsWith("\n")) body = body.substring(1)
            }
            if (pyStrip(body).isNotEmpty()) thoughts.add(pyStrip(body))
        }
        text = CHANNEL_RE.replace(text, "")
        val calls = CALL_RE.findAll(text).map { parseToolCall(it.groupValues[1]) }.toList()
        text = CALL_RE.replace(text, "")
        if (GemmaFormat.TOOL_CALL_START in text) {
            throw ToolCallParseException(
                "tool call: ${GemmaFormat.TOOL_CALL_START} without ${GemmaFormat.TOOL_CALL_END} in '${text.takeLast(80)}'",
            )
        }
        return ParsedResponse(pyStrip(text), if (thoughts.isEmpty()) null else thoughts.joinToString("\n"), calls)
    }

    /** Parse the inside of one `<|tool_call>...<tool_call|>` block (`call:NAME{...}`). */
    fun parseToolCall(block: String): ToolCall {
        val m = CALL_HEAD_RE.matchEntire(block)
            ?: throw ToolCallParseException("tool call: expected 'call:NAME{...}', found '${block.take(80)}'")
        return ToolCall(m.groupValues[1], parseArguments(m.groupValues[2]))
    }

    /** Parse a call's `{key:value,...}` payload (Gemma syntax, or plain JSON) into a map. */
    fun parseArguments(text: String): Map<String, Any?> {
        val p = ArgParser(pyStrip(text))
        val result = p.obj()
        p.ws()
        if (p.i != p.s.length) throw p.error("trailing text after the arguments")
        return result
    }

    /** Python's `str.strip()`: Kotlin's `trim()` uses the same notion of whitespace for the characters that matter. */
    internal fun pyStrip(s: String): String = s.trim()
}

/** Recursive descent over Gemma's argument syntax, the same grammar and quirks as `_ArgParser` in chat.py. */
private class ArgParser(val s: String) {
    var i = 0

    fun error(what: String): ToolCallParseException {
        val near = s.substring(maxOf(0, i - 20), minOf(s.length, i + 20))
        return ToolCallParseException("tool call arguments: $what at offset $i (near '$near')")
    }

    fun ws() {
        while (i < s.length && s[i] in " \t\r\n") i++
    }

    private fun peek(token: String) = s.startsWith(token, i)

    private fun expect(token: String) {
        ws()
        if (!peek(token)) throw error("expected '$token'")
        i += token.length
    }

    private fun string(): String {
        i += GemmaFormat.ESCAPE.length
        val end = s.indexOf(GemmaFormat.ESCAPE, i)
        if (end < 0) throw error("unterminated <|\"|> string")
        val out = s.substring(i, end)
        i = end + GemmaFormat.ESCAPE.length
        return out
    }

    private fun key(): String {
        ws()
        if (peek(GemmaFormat.ESCAPE)) return string()
        if (peek("\"")) {
            val end = s.indexOf('"', i + 1)
            if (end < 0) throw error("unterminated key")
            val out = s.substring(i + 1, end)
            i = end + 1
            return out
        }
        val m = KEY_RE.matchAt(s, i) ?: throw error("expected a key")
        i = m.range.last + 1
        return m.value
    }

    fun obj(): Map<String, Any?> {
        expect("{")
        val out = LinkedHashMap<String, Any?>()
        ws()
        if (peek("}")) {
            i++
            return out
        }
        while (true) {
            val k = key()
            expect(":")
            out[k] = value()
            ws()
            if (peek(",")) {
                i++
                continue
            }
            expect("}")
            return out
        }
    }

    private fun array(): List<Any?> {
        expect("[")
        val out = ArrayList<Any?>()
        ws()
        if (peek("]")) {
            i++
            return out
        }
        while (true) {
            out.add(value())
            ws()
            if (peek(",")) {
                i++
                continue
            }
            expect("]")
            return out
        }
    }

    private fun value(): Any? {
        ws()
        if (peek(GemmaFormat.ESCAPE)) return string()
        if (peek("{")) return obj()
        if (peek("[")) return array()
        if (peek("\"")) { // a JSON string (the template passes string arguments through verbatim)
            val (v, end) = try {
                Json.parseStringAt(s, i)
            } catch (e: JsonException) {
                throw error("bad JSON string (${e.message})")
            }
            i = end
            return v
        }
        val m = BARE_RE.matchAt(s, i) ?: throw error("expected a value")
        i = m.range.last + 1
        val word = m.value.trim()
        when (word) {
            "true", "True" -> return true
            "false", "False" -> return false
            "null", "None" -> return null
        }
        // Python: float(word) if re.search(r"[.eE]", word) else int(word); a word neither accepts stays a string.
        return if (word.any { it == '.' || it == 'e' || it == 'E' }) {
            val d = pyFloat(word) ?: return word
            if (d.isFinite()) d else word
        } else {
            pyInt(word) ?: word
        }
    }

    companion object {
        val KEY_RE = Regex("(?U)[^:{}\\[\\],\\s]+")
        val BARE_RE = Regex("[^,}\\]]+")

        // Python's int()/float() literal syntax (ASCII digits): optional sign, '_' only between digits.
        private const val DIGITS = "[0-9](?:_?[0-9])*"
        private val INT_RE = Regex("[+-]?$DIGITS")
        private val FLOAT_RE = Regex("[+-]?(?:(?:$DIGITS)?\\.$DIGITS|$DIGITS\\.?)(?:[eE][+-]?$DIGITS)?")
        private val FLOAT_SPECIAL_RE = Regex("(?i)[+-]?(?:inf|infinity|nan)")

        fun pyInt(word: String): Any? {
            if (!INT_RE.matches(word)) return null
            val clean = word.replace("_", "").removePrefix("+")
            return clean.toLongOrNull() ?: BigInteger(clean)
        }

        fun pyFloat(word: String): Double? {
            if (FLOAT_SPECIAL_RE.matches(word)) return Double.NaN // non-finite: the caller keeps the word
            if (!FLOAT_RE.matches(word)) return null
            return word.replace("_", "").toDouble()
        }
    }
}
