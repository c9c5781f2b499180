package org.edgegemma.core

import java.io.ByteArrayOutputStream
import kotlin.math.PI
import kotlin.math.ceil
import kotlin.math.cos
import kotlin.math.floor
import kotlin.math.roundToInt
import kotlin.math.sin

/**
 * Microphone audio for Gemma 4's audio encoder, which takes 16 kHz mono: 16-bit PCM to float, fixed-size chunking
 * of what AudioRecord delivers, band-limited resampling for devices that record only at 44.1/48 kHz, and a WAV
 * container (LiteRT-LM's `Content.AudioBytes` takes an encoded file, not raw samples).
 */
object Pcm {
    const val TARGET_RATE = 16_000

    /** 16-bit signed samples -> floats in [-1, 1). */
    fun toFloat(samples: ShortArray, count: Int = samples.size): FloatArray = FloatArray(count) { samples[it] / 32768f }

    /** Little-endian 16-bit PCM bytes -> floats in [-1, 1); a trailing odd byte is an error. */
    fun toFloat(bytes: ByteArray): FloatArray {
        require(bytes.size % 2 == 0) { "PCM16 data has an odd number of bytes (${bytes.size})" }
        return FloatArray(bytes.size / 2) {
            val lo = bytes[2 * it].toInt() and 0xff
            val hi = bytes[2 * it + 1].toInt()
            ((hi shl 8) or lo).toShort() / 32768f
        }
    }

    /**
     * Resample mono [input] from [fromRate] to [toRate] with a Blackman-windowed sinc, cut off at the lower Nyquist
     * frequency (so downsampling does not alias) with [zeroCrossings] lobes each side. Output length is
     * floor(n * toRate / fromRate); output sample j sits at input position j * fromRate / toRate.
     */
    fun resample(input: FloatArray, fromRate: Int, toRate: Int = TARGET_RATE, zeroCrossings: Int = 16): FloatArray {
        require(fromRate > 0 && toRate > 0) { "sample rates must be positive, got $fromRate -> $toRate" }
        if (fromRate == toRate) return input.copyOf()
        val outLen = (input.size.toLong() * toRate / fromRate).toInt()
        val step = fromRate.toDouble() / toRate
        val cutoff = minOf(1.0, toRate.toDouble() / fromRate) // of the input Nyquist frequency
        val half = ceil(zeroCrossings / cutoff).toInt() // filter half-width in input samples
        val out = FloatArray(outLen)
        for (j in 0 until outLen) {
            val t = j * step
            val center = floor(t).toInt()
            var acc = 0.0
            for (k in center - half + 1..center + half) {
                if (k < 0 || k >= input.size) continue
                val d = t - k
                if (d <= -half || d >= half) continue
                val x = cutoff * d
                val sinc = if (x == 0.0) 1.0 else sin(PI * x) / (PI * x)
                val w = 0.42 + 0.5 * cos(PI * d / half) + 0.08 * cos(2 * PI * d / half) // Blackman, centred
                acc += input[k] * cutoff * sinc * w
            }
            out[j] = acc.toFloat()
        }
        return out
    }

    /** Mono float samples -> a 16-bit PCM WAV file (RIFF, little-endian), clipped to [-1, 1]. */
    fun wav(samples: FloatArray, rate: Int = TARGET_RATE): ByteArray {
        val data = samples.size * 2
        val out = ByteArrayOutputStream(44 + data)
        fun u32(v: Int) = out.write(byteArrayOf(v.toByte(), (v shr 8).toByte(), (v shr 16).toByte(), (v shr 24).toByte()))
        fun u16(v: Int) = out.write(byteArrayOf(v.toByte(), (v shr 8).toByte()))
        out.write("RIFF".toByteArray())
        u32(36 + data)
        out.write("WAVEfmt ".toByteArray())
        u32(16) // fmt chunk size
        u16(1) // PCM
        u16(1) // mono
        u32(rate)
        u32(rate * 2) // byte rate
        u16(2) // block align
        u16(16) // bits per sample
        out.write("data".toByteArray())
        u32(data)
        for (s in samples) u16((s.coerceIn(-1f, 1f) * 32767f).roundToInt())
        return out.toByteArray()
    }
}

/**
 * Collects AudioRecord reads (any size) into fixed chunks of [chunkSamples], e.g. 100 ms for the level meter, and
 * caps a recording at [maxSamples] (the app stops hold-to-talk there).
 */
class PcmChunker(private val chunkSamples: Int, private val maxSamples: Int = Int.MAX_VALUE) {
    init {
        require(chunkSamples > 0) { "chunkSamples must be positive, got $chunkSamples" }
    }

    private val pending = FloatArray(chunkSamples)
    private var fill = 0
    private val chunks = ArrayList<FloatArray>()
    var total = 0
        private set

    /** True once [maxSamples] samples were taken; later input is dropped. */
    val full: Boolean get() = total >= maxSamples

    /** Add [count] samples; returns the chunks completed by them. */
    fun push(samples: ShortArray, count: Int = samples.size): List<FloatArray> = push(Pcm.toFloat(samples, count))

    fun push(samples: FloatArray): List<FloatArray> {
        val done = ArrayList<FloatArray>()
        val take = minOf(samples.size, maxSamples - total)
        var i = 0
        while (i < take) {
            val n = minOf(chunkSamples - fill, take - i)
            samples.copyInto(pending, fill, i, i + n)
            fill += n
            i += n
            if (fill == chunkSamples) {
                val c = pending.copyOf()
                chunks.add(c)
                done.add(c)
                fill = 0
            }
        }
        total += maxOf(0, take)
        return done
    }

    /** Every sample taken, complete chunks and the partial last one, in order. */
    fun samples(): FloatArray {
        val out = FloatArray(chunks.size * chunkSamples + fill)
        chunks.forEachIndexed { k, c -> c.copyInto(out, k * chunkSamples) }
        pending.copyInto(out, chunks.size * chunkSamples, 0, fill)
        return out
    }
}
