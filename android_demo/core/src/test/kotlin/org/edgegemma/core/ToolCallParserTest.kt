package org.edgegemma.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Assert.assertThrows
import org.junit.Test

/** Expected values follow the grammar documented in edge_gemma/chat.py; tests/test_android_demo.py also compares
 *  this parser with the Python one on the same outputs. */
class ToolCallParserTest {
    private val q = GemmaFormat.ESCAPE

    @Test
    fun parsesACallWithGemmaStringsNumbersAndNesting() {
        val text = "Let me check.<|tool_call>call:get_weather{city:${q}Paris, FR${q},days:3,scale:1.5,opts:{metric:true,tags:[${q}a${q},null]}}<tool_call|><turn|>ignored"
        val r = ToolCallParser.parseResponse(text)
        assertEquals("Let me check.", r.answer)
        assertNull(r.thinking)
        assertEquals(
            listOf(
                ToolCall(
                    "get_weather",
                    mapOf("city" to "Paris, FR", "days" to 3L, "scale" to 1.5, "opts" to mapOf("metric" to true, "tags" to listOf("a", null))),
                ),
            ),
            r.toolCalls,
        )
    }

    @Test
    fun stringsMayContainCommaKeyColonSequences() {
        val args = ToolCallParser.parseArguments("{note:${q}a,b:c}${q},n:-2}")
        assertEquals(mapOf("note" to "a,b:c}", "n" to -2L), args)
    }

    @Test
    fun bareWordsFollowPythonIntAndFloat() {
        val args = ToolCallParser.parseArguments("{a:1_000,b:1e3,c:nan,d:1e400,e:hello world,f:None,g:+7,h:.5,i:1.}")
        assertEquals(
            mapOf("a" to 1000L, "b" to 1000.0, "c" to "nan", "d" to "1e400", "e" to "hello world", "f" to null, "g" to 7L, "h" to 0.5, "i" to 1.0),
            args,
        )
    }

    @Test
    fun jsonStringsAndQuotedKeysAreAccepted() {
        assertEquals(mapOf("k" to "v\n", "x" to 1L), ToolCallParser.parseArguments("{\"k\": \"v\\n\", ${q}x${q}: 1}"))
    }

    @Test
    fun thinkingIsSeparatedAndStopsCutTheText() {
        val r = ToolCallParser.parseResponse("<|channel>thought\nplan it<channel|>Answer<eos> here<|tool_response>junk")
        assertEquals("Answer here", r.answer)
        assertEquals("plan it", r.thinking)
        val open = ToolCallParser.parseResponse("<|channel>thought\nstill thinking")
        assertEquals("", open.answer)
        assertEquals("still thinking", open.thinking)
    }

    @Test
    fun malformedCallsAreErrors() {
        for (bad in listOf(
            "<|tool_call>call:f{a:1<tool_call|>",
            "<|tool_call>f{a:1}<tool_call|>",
            "<|tool_call>call:f{a:${q}x}<tool_call|>",
            "text <|tool_call>call:f{a:1}",
            "<|tool_call>call:f{a:1}}<tool_call|>",
        )) {
            assertThrows(bad, ToolCallParseException::class.java) { ToolCallParser.parseResponse(bad) }
        }
    }
}
