package org.edgegemma.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Test
import kotlin.random.Random

class StreamAssemblerTest {
    private val q = GemmaFormat.ESCAPE
    private val turn = "<|channel>thought\nThe user wants weather.<channel|>Sure.<|tool_call>call:weather{city:${q}Oslo${q}}<tool_call|> Done<turn|>after the stop"

    private fun chunked(text: String, rng: Random): List<String> {
        val out = ArrayList<String>()
        var i = 0
        while (i < text.length) {
            val n = 1 + rng.nextInt(6)
            out.add(text.substring(i, minOf(text.length, i + n)))
            i += n
        }
        return out
    }

    @Test
    fun anyChunkingGivesTheSameResultAsParsingTheWholeText() {
        val whole = ToolCallParser.parseResponse(turn)
        for (seed in 0 until 50) {
            val a = StreamAssembler()
            for (c in chunked(turn, Random(seed))) a.push(c)
            assertTrue(a.stopped)
            assertEquals(GemmaFormat.TURN_END, a.stopReason)
            assertEquals(whole, a.finish())
            assertEquals(whole.answer, a.display().answer)
        }
    }

    @Test
    fun stopSplitAcrossChunksIsFoundAndLaterTextIgnored() {
        val a = StreamAssembler()
        a.push("Hello <tu")
        assertFalse(a.stopped)
        assertEquals("Hello", a.display().answer) // "<tu" is held back, not shown
        a.push("rn|> more")
        assertTrue(a.stopped)
        a.push(" ignored")
        assertEquals("Hello ", a.text())
    }

    @Test
    fun partialMarkersAreHeldBackAndToolCallsHidden() {
        val a = StreamAssembler()
        assertEquals("Hi", a.push("Hi <|tool_ca").answer)
        val d = a.push("ll>call:f{x:1")
        assertTrue(d.toolCallPending)
        assertEquals("Hi", d.answer)
        val done = a.push("}<tool_call|> ok")
        assertFalse(done.toolCallPending)
        assertEquals("Hi  ok", done.answer)
        assertEquals(listOf(ToolCall("f", mapOf("x" to 1L))), a.finish().toolCalls)
    }

    @Test
    fun thinkingStreamsSeparately() {
        val a = StreamAssembler()
        val d = a.push("<|channel>thought\nhmm, let me")
        assertEquals("hmm, let me", d.thinking)
        assertEquals("", d.answer)
        assertEquals("Yes", a.push(" see<channel|>Yes").answer)
    }

    @Test
    fun turnTimerMeasuresTtftAndDecodeRate() {
        var now = 0L
        val t = TurnTimer { now }
        now = 250_000_000L // first token after 250 ms
        t.onToken()
        repeat(10) {
            now += 50_000_000L // then one token every 50 ms
            t.onToken()
        }
        now += 1_000_000L
        val s = t.finish()
        assertEquals(250.0, s.ttftMillis, 1e-9)
        assertEquals(11, s.tokens)
        assertEquals(20.0, s.decodeTokensPerSecond!!, 1e-9)
        assertEquals(751.0, s.totalMillis, 1e-9)
    }
}
