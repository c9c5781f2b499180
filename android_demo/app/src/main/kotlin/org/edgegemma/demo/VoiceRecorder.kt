package org.edgegemma.demo

import android.annotation.SuppressLint
import android.media.AudioFormat
import android.media.AudioRecord
import android.media.MediaRecorder
import org.edgegemma.core.Pcm
import org.edgegemma.core.PcmChunker
import kotlin.concurrent.thread
import kotlin.math.sqrt

/**
 * Hold-to-talk: records mono 16-bit PCM with AudioRecord at 16 kHz (Gemma 4's audio rate), or at 48/44.1 kHz on
 * devices that refuse 16 kHz, in 100 ms chunks (core's [PcmChunker], which also caps a clip at [maxSeconds]).
 * [stop] returns the clip as a 16 kHz WAV (core's [Pcm.resample] + [Pcm.wav]) for LiteRT-LM's `Content.AudioBytes`.
 */
class VoiceRecorder(private val maxSeconds: Int = 30, private val onLevel: (Float) -> Unit = {}) {
    private var record: AudioRecord? = null
    private var worker: Thread? = null
    @Volatile private var running = false
    private var chunker: PcmChunker? = null
    private var rate = Pcm.TARGET_RATE

    /** Caller holds RECORD_AUDIO. Throws IllegalStateException when no supported rate opens. */
    @SuppressLint("MissingPermission")
    fun start() {
        val (r, rec) = RATES.firstNotNullOfOrNull { candidate ->
            val min = AudioRecord.getMinBufferSize(candidate, AudioFormat.CHANNEL_IN_MONO, AudioFormat.ENCODING_PCM_16BIT)
            if (min <= 0) return@firstNotNullOfOrNull null
            val rec = AudioRecord(MediaRecorder.AudioSource.VOICE_RECOGNITION, candidate, AudioFormat.CHANNEL_IN_MONO,
                AudioFormat.ENCODING_PCM_16BIT, maxOf(min, candidate / 5 * 2))
            if (rec.state == AudioRecord.STATE_INITIALIZED) candidate to rec else { rec.release(); null }
        } ?: throw IllegalStateException("AudioRecord: none of $RATES Hz mono PCM16 could be opened")
        rate = r
        record = rec
        val c = PcmChunker(chunkSamples = r / 10, maxSamples = r * maxSeconds)
        chunker = c
        running = true
        rec.startRecording()
        worker = thread(name = "voice-recorder") {
            val buf = ShortArray(r / 50)
            while (running && !c.full) {
                val n = rec.read(buf, 0, buf.size)
                if (n <= 0) continue
                for (chunk in c.push(buf, n)) onLevel(sqrt(chunk.fold(0f) { a, x -> a + x * x } / chunk.size))
            }
        }
    }

    /** Stop and return the clip as 16 kHz mono WAV bytes (null when nothing was recorded). */
    fun stop(): ByteArray? {
        running = false
        worker?.join(1_000)
        record?.run { stop(); release() }
        record = null
        val samples = chunker?.samples() ?: return null
        chunker = null
        if (samples.isEmpty()) return null
        return Pcm.wav(Pcm.resample(samples, rate, Pcm.TARGET_RATE), Pcm.TARGET_RATE)
    }

    private companion object {
        val RATES = listOf(Pcm.TARGET_RATE, 48_000, 44_100)
    }
}
