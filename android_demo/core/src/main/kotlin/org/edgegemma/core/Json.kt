package org.edgegemma.core

import java.math.BigInteger

/**
 * A small, strict JSON reader and writer (RFC 8259), so that `core` needs nothing beyond the Kotlin standard library
 * and the JDK: the app's manifest and bundle index are read with it, and the cross-language tests write with it.
 *
 * Values map to Kotlin as: object -> `Map<String, Any?>` (insertion order kept), array -> `List<Any?>`,
 * string -> `String`, integer -> `Long` (or `BigInteger` beyond 64 bits), other numbers -> `Double`,
 * `true`/`false` -> `Boolean`, `null` -> `null`. Integers and floats stay distinct, as in Python's `json` module.
 */
object Json {
    /** Parse one JSON document; [what] names the file or field in error messages. */
    fun parse(text: String, what: String = "JSON"): Any? {
        val reader = Reader(text, what)
        reader.ws()
        val value = reader.value()
        reader.ws()
        if (reader.i != text.length) throw reader.error("trailing text after the JSON value")
        return value
    }

    /**
     * Parse the JSON string literal starting at [start] (which must be a `"`); returns the string and the offset just
     * past its closing quote. Used by the tool-call parser, like Python's `json.JSONDecoder().raw_decode`.
     */
    fun parseStringAt(text: String, start: Int, what: String = "JSON string"): Pair<String, Int> {
        val reader = Reader(text, what)
        reader.i = start
        val s = reader.string()
        return s to reader.i
    }

    /** Serialize [value] compactly. With [sortKeys], object keys are written in code-point order (Python's sort_keys). */
    fun write(value: Any?, sortKeys: Boolean = false): String = StringBuilder().also { write(value, it, sortKeys) }.toString()

    private fun write(value: Any?, out: StringBuilder, sortKeys: Boolean) {
        when (value) {
            null -> out.append("null")
            is String -> quote(value, out)
            is Boolean -> out.append(value.toString())
            is Int, is Long, is Short, is Byte, is BigInteger -> out.append(value.toString())
            is Double -> {
                require(value.isFinite()) { "JSON cannot represent $value" }
                out.append(value.toString())
            }
            is Float -> write(value.toDouble(), out, sortKeys)
            is Map<*, *> -> {
                out.append('{')
                val keys = value.keys.map { it as? String ?: throw IllegalArgumentException("JSON object key $it is not a string") }
                var first = true
                for (k in if (sortKeys) keys.sorted() else keys) {
                    if (!first) out.append(',')
                    first = false
                    quote(k, out)
                    out.append(':')
                    write(value[k], out, sortKeys)
                }
                out.append('}')
            }
            is Iterable<*> -> {
                out.append('[')
                var first = true
                for (v in value) {
                    if (!first) out.append(',')
                    first = false
                    write(v, out, sortKeys)
                }
                out.append(']')
            }
            else -> throw IllegalArgumentException("cannot write ${value::class.simpleName} as JSON")
        }
    }

    private fun quote(s: String, out: StringBuilder) {
        out.append('"')
        for (c in s) {
            when (c) {
                '"' -> out.append("\\\"")
                '\\' -> out.append("\\\\")
                '\n' -> out.append("\\n")
                '\r' -> out.append("\\r")
                '\t' -> out.append("\\t")
                '\b' -> out.append("\\b")
                '\u000C' -> out.append("\\f")
                else -> if (c < ' ') out.append("\\u%04x".format(c.code)) else out.append(c)
            }
        }
        out.append('"')
    }

    private class Reader(val s: String, val what: String) {
        var i = 0

        fun error(message: String): JsonException {
            val line = s.substring(0, minOf(i, s.length)).count { it == '\n' } + 1
            return JsonException("$what: $message at offset $i (line $line)")
        }

        fun ws() {
            while (i < s.length && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++
        }

        fun value(): Any? {
            if (i >= s.length) throw error("expected a value, found the end of the text")
            return when (val c = s[i]) {
                '{' -> obj()
                '[' -> array()
                '"' -> string()
                't' -> literal("true", true)
                'f' -> literal("false", false)
                'n' -> literal("null", null)
                else -> if (c == '-' || c in '0'..'9') number() else throw error("unexpected character '$c'")
            }
        }

        private fun literal(word: String, v: Any?): Any? {
            if (!s.startsWith(word, i)) throw error("expected '$word'")
            i += word.length
            return v
        }

        private fun obj(): Map<String, Any?> {
            i++ // {
            val out = LinkedHashMap<String, Any?>()
            ws()
            if (i < s.length && s[i] == '}') {
                i++
                return out
            }
            while (true) {
                ws()
                if (i >= s.length || s[i] != '"') throw error("expected a string key")
                val key = string()
                ws()
                if (i >= s.length || s[i] != ':') throw error("expected ':' after key \"$key\"")
                i++
                ws()
                out[key] = value()
                ws()
                if (i < s.length && s[i] == ',') {
                    i++
                    continue
                }
                if (i < s.length && s[i] == '}') {
                    i++
                    return out
                }
                throw error("expected ',' or '}' in object")
            }
        }

        private fun array(): List<Any?> {
            i++ // [
            val out = ArrayList<Any?>()
            ws()
            if (i < s.length && s[i] == ']') {
                i++
                return out
            }
            while (true) {
                ws()
                out.add(value())
                ws()
                if (i < s.length && s[i] == ',') {
                    i++
                    continue
                }
                if (i < s.length && s[i] == ']') {
                    i++
                    return out
                }
                throw error("expected ',' or ']' in array")
            }
        }

        fun string(): String {
            if (i >= s.length || s[i] != '"') throw error("expected '\"'")
            i++
            val out = StringBuilder()
            while (true) {
                if (i >= s.length) throw error("unterminated string")
                val c = s[i++]
                when {
                    c == '"' -> return out.toString()
                    c == '\\' -> {
                        if (i >= s.length) throw error("unterminated escape")
                        when (val e = s[i++]) {
                            '"' -> out.append('"')
                            '\\' -> out.append('\\')
                            '/' -> out.append('/')
                            'b' -> out.append('\b')
                            'f' -> out.append('\u000C')
                            'n' -> out.append('\n')
                            'r' -> out.append('\r')
                            't' -> out.append('\t')
                            'u' -> {
                                if (i + 4 > s.length) throw error("truncated \\u escape")
                                val hex = s.substring(i, i + 4)
                                if (!hex.all { it in '0'..'9' || it in 'a'..'f' || it in 'A'..'F' }) throw error("bad \\u escape '$hex'")
                                out.append(hex.toInt(16).toChar())
                                i += 4
                            }
                            else -> throw error("bad escape '\\$e'")
                        }
                    }
                    c < ' ' -> {
                        i--
                        throw error("control character U+%04X in string".format(c.code))
                    }
                    else -> out.append(c)
                }
            }
        }

        private fun number(): Any {
            val m = NUMBER.matchAt(s, i) ?: throw error("bad number")
            i = m.range.last + 1
            val text = m.value
            return if (m.groups[2] == null && m.groups[3] == null) {
                text.toLongOrNull() ?: BigInteger(text)
            } else {
                text.toDouble()
            }
        }
    }

    private val NUMBER = Regex("""-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?""")
}

/** Malformed JSON; the message names the file or field, the offset and what was expected. */
class JsonException(message: String) : IllegalArgumentException(message)
