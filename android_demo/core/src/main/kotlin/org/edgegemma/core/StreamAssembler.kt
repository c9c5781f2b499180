package org.edgegemma.core

/**
 * Assembles a streamed answer chunk by chunk: stops at the first stop string (even one split across chunks), keeps
 * the thinking channel and tool-call blocks out of the visible answer while they stream, and holds back a trailing
 * partial marker (`<turn`, `<|tool_ca`...) so the UI never flashes half a special token.
 *
 * [finish] parses the whole turn with [ToolCallParser.parseResponse], so the final result is exactly what the Python
 * `parse_response` gives for the same text, however the text was chunked.
 */
class StreamAssembler(private val stopStrings: List<String> = GemmaFormat.STOP_STRINGS) {
    private val raw = StringBuilder()

    /** True once a stop string arrived; later chunks are ignored. */
    var stopped = false
        private set

    /** The stop string that ended the turn, if any. */
    var stopReason: String? = null
        private set

    /** What the UI shows while streaming. [toolCallPending] is true inside an unfinished `<|tool_call>` block. */
    data class Display(val answer: String, val thinking: String, val toolCallPending: Boolean, val stopped: Boolean)

    /** Add one streamed chunk; returns the display state after it. */
    fun push(chunk: String): Display {
        if (!stopped && chunk.isNotEmpty()) {
            val from = maxOf(0, raw.length - (stopStrings.maxOfOrNull { it.length } ?: 1) + 1)
            raw.append(chunk)
            var cut = -1
            for (stop in stopStrings) {
                val at = raw.indexOf(stop, from)
                if (at >= 0 && (cut < 0 || at < cut)) {
                    cut = at
                    stopReason = stop
                }
            }
            if (cut >= 0) {
                raw.setLength(cut)
                stopped = true
            }
        }
        return display()
    }

    /** The text received so far (cut at the stop string). */
    fun text(): String = raw.toString()

    fun display(): Display {
        var text = raw.toString()
        if (!stopped) text = text.substring(0, text.length - partialMarkerLength(text))
        text = text.replace(GemmaFormat.EOS, "")
        val answer = StringBuilder()
        val thinking = StringBuilder()
        var pending = false
        var i = 0
        while (i < text.length) {
            val ch = text.indexOf(GemmaFormat.CHANNEL_START, i)
            val tc = text.indexOf(GemmaFormat.TOOL_CALL_START, i)
            val next = listOf(ch, tc).filter { it >= 0 }.minOrNull()
            if (next == null) {
                answer.append(text, i, text.length)
                break
            }
            answer.append(text, i, next)
            if (next == ch) {
                val bodyStart = ch + GemmaFormat.CHANNEL_START.length
                val end = text.indexOf(GemmaFormat.CHANNEL_END, bodyStart)
                var body = text.substring(bodyStart, if (end < 0) text.length else end)
                if (body.startsWith("thought")) body = body.removePrefix("thought").removePrefix("\n")
                if (thinking.isNotEmpty() && body.isNotBlank()) thinking.append('\n')
                thinking.append(body.trim())
                i = if (end < 0) text.length else end + GemmaFormat.CHANNEL_END.length
            } else {
                val end = text.indexOf(GemmaFormat.TOOL_CALL_END, tc)
                if (end < 0) {
                    pending = true
                    i = text.length
                } else {
                    i = end + GemmaFormat.TOOL_CALL_END.length
                }
            }
        }
        return Display(answer.toString().trim(), thinking.toString(), pending, stopped)
    }

    /** The whole turn, parsed (thinking, tool calls, answer); throws [ToolCallParseException] for a malformed call. */
    fun finish(): ParsedResponse = ToolCallParser.parseResponse(raw.toString())

    private fun partialMarkerLength(text: String): Int {
        var best = 0
        for (marker in MARKERS + stopStrings) {
            for (k in minOf(marker.length - 1, text.length) downTo 1) {
                if (k > best && text.endsWith(marker.substring(0, k))) {
                    best = k
                    break
                }
            }
        }
        return best
    }

    private companion object {
        val MARKERS = listOf(
            GemmaFormat.CHANNEL_START, GemmaFormat.CHANNEL_END, GemmaFormat.TOOL_CALL_START, GemmaFormat.TOOL_CALL_END,
            GemmaFormat.EOS,
        )
    }
}

/** Time to first token and decode speed of one turn. [decodeTokensPerSecond] is null with fewer than two tokens. */
data class TurnStats(val ttftMillis: Double, val tokens: Int, val decodeTokensPerSecond: Double?, val totalMillis: Double) {
    fun summary(): String =
        "TTFT %.0f ms · %d tok · %s".format(ttftMillis, tokens, decodeTokensPerSecond?.let { "%.1f tok/s".format(it) } ?: "- tok/s")
}

/**
 * Measures a turn from the moment the message is sent. Time to first token includes prefill (the prompt, images and
 * audio); tok/s counts the tokens after the first over the time after the first, i.e. the decode rate alone.
 * [clockNanos] is injectable for tests; the app uses `System.nanoTime`.
 */
class TurnTimer(private val clockNanos: () -> Long = System::nanoTime) {
    private val start = clockNanos()
    private var first = -1L
    private var last = -1L
    private var tokens = 0

    /** Call once per streamed token (LiteRT-LM delivers one message per decode step). */
    fun onToken(count: Int = 1) {
        if (count <= 0) return
        val now = clockNanos()
        if (first < 0) first = now
        last = now
        tokens += count
    }

    fun finish(): TurnStats {
        val end = clockNanos()
        val ttft = if (first < 0) Double.NaN else (first - start) / 1e6
        val rate = if (tokens >= 2 && last > first) (tokens - 1) / ((last - first) / 1e9) else null
        return TurnStats(ttft, tokens, rate, (end - start) / 1e6)
    }
}
