package org.edgegemma.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertThrows
import org.junit.Assert.assertTrue
import org.junit.Test
import java.math.BigInteger

class JsonTest {
    @Test
    fun parsesEveryValueKind() {
        val v = Json.parse("""{"a": [1, -2.5e1, 0.5, true, false, null], "b": {"c": "x\ny\u00e9\"\\/"}, "big": 123456789012345678901}""")
        assertEquals(
            mapOf(
                "a" to listOf(1L, -25.0, 0.5, true, false, null),
                "b" to mapOf("c" to "x\nyé\"\\/"),
                "big" to BigInteger("123456789012345678901"),
            ),
            v,
        )
    }

    @Test
    fun integersAndFloatsStayDistinct() {
        assertTrue(Json.parse("1") is Long)
        assertTrue(Json.parse("1.0") is Double)
        assertTrue(Json.parse("1e2") is Double)
    }

    @Test
    fun roundTripsThroughTheWriter() {
        val v = mapOf("z" to listOf(1L, 2.5, "q\"\u0001"), "a" to null, "m" to mapOf<String, Any?>())
        assertEquals(v, Json.parse(Json.write(v)))
        assertEquals("""{"a":null,"m":{},"z":[1,2.5,"q\"\u0001"]}""", Json.write(v, sortKeys = true))
    }

    @Test
    fun rejectsMalformedJsonNamingTheSource() {
        for (bad in listOf("{", "[1,]", "{\"a\" 1}", "01", "1.", "\"\u0001\"", "tru", "{} x", "{'a': 1}")) {
            val e = assertThrows(JsonException::class.java) { Json.parse(bad, "demo.json") }
            assertTrue(e.message!!, e.message!!.startsWith("demo.json: "))
        }
    }

    @Test
    fun parsesAStringInsideLargerText() {
        val (s, end) = Json.parseStringAt("x:\"a\\\"b\",y", 2)
        assertEquals("a\"b", s)
        assertEquals(8, end)
    }
}
