package org.edgegemma.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test
import kotlin.math.PI
import kotlin.math.abs
import kotlin.math.sin
import kotlin.math.sqrt

/** Golden values are mathematical: a band-limited tone resampled is the same tone sampled at the new rate. */
class PcmTest {
    private fun tone(freq: Double, rate: Int, n: Int, amp: Double = 0.5) = FloatArray(n) { (amp * sin(2 * PI * freq * it / rate)).toFloat() }

    private fun rms(x: FloatArray, from: Int, to: Int): Double = sqrt((from until to).sumOf { x[it].toDouble() * x[it] } / (to - from))

    @Test
    fun downsampledToneMatchesTheToneAtTheNewRate() {
        for (from in listOf(48_000, 44_100, 22_050)) {
            val x = tone(440.0, from, from) // one second
            val y = Pcm.resample(x, from, 16_000)
            assertEquals(16_000, y.size)
            val expected = tone(440.0, 16_000, 16_000)
            var worst = 0.0
            for (j in 1_000 until 15_000) worst = maxOf(worst, abs(y[j] - expected[j]).toDouble()) // away from the edges
            assertTrue("$from Hz: max error $worst", worst < 2e-3)
        }
    }

    @Test
    fun upsamplingAlsoReproducesTheTone() {
        val y = Pcm.resample(tone(1_000.0, 8_000, 8_000), 8_000, 16_000)
        val expected = tone(1_000.0, 16_000, 16_000)
        for (j in 1_000 until 15_000) assertEquals(expected[j], y[j], 2e-3f)
    }

    @Test
    fun tonesAboveTheNewNyquistAreRemovedNotAliased() {
        val x = tone(11_000.0, 48_000, 48_000) // 11 kHz would alias to 5 kHz at 16 kHz
        val y = Pcm.resample(x, 48_000, 16_000)
        assertTrue(rms(y, 1_000, 15_000) < 0.005) // input RMS is 0.354
    }

    @Test
    fun sameRateIsACopy() {
        val x = tone(300.0, 16_000, 100)
        assertArrayEquals(x, Pcm.resample(x, 16_000, 16_000), 0f)
    }

    @Test
    fun pcm16BytesAreLittleEndianSigned() {
        val f = Pcm.toFloat(byteArrayOf(0x00, 0x80.toByte(), 0xff.toByte(), 0x7f, 0x01, 0x00))
        assertArrayEquals(floatArrayOf(-1f, 32767 / 32768f, 1 / 32768f), f, 0f)
    }

    @Test
    fun chunkerSplitsArbitraryReadsIntoFixedChunksAndCaps() {
        val c = PcmChunker(chunkSamples = 4, maxSamples = 10)
        assertEquals(0, c.push(ShortArray(3) { (it + 1).toShort() }).size)
        val done = c.push(ShortArray(3) { (it + 4).toShort() })
        assertEquals(1, done.size)
        assertArrayEquals(FloatArray(4) { (it + 1) / 32768f }, done[0], 0f)
        c.push(ShortArray(8) { (it + 7).toShort() }) // only 4 more fit under the cap
        assertTrue(c.full)
        assertEquals(10, c.total)
        assertArrayEquals(FloatArray(10) { (it + 1) / 32768f }, c.samples(), 0f)
    }

    @Test
    fun wavHeaderDescribes16kMonoPcm16() {
        val w = Pcm.wav(floatArrayOf(0f, 1f, -1f, 0.5f))
        assertEquals("RIFF", String(w, 0, 4))
        assertEquals("WAVE", String(w, 8, 4))
        assertEquals(44 + 8, w.size)
        fun u32(at: Int) = (w[at].toInt() and 0xff) or ((w[at + 1].toInt() and 0xff) shl 8) or ((w[at + 2].toInt() and 0xff) shl 16) or ((w[at + 3].toInt() and 0xff) shl 24)
        assertEquals(16_000, u32(24))
        assertEquals(8, u32(40))
        assertArrayEquals(floatArrayOf(0f, 32767 / 32768f, -32767 / 32768f, 16384 / 32768f), Pcm.toFloat(w.copyOfRange(44, 52)), 0f)
    }
}
