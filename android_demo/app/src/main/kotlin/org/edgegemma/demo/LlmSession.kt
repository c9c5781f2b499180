package org.edgegemma.demo

import com.google.ai.edge.litertlm.Backend
import com.google.ai.edge.litertlm.Content
import com.google.ai.edge.litertlm.Contents
import com.google.ai.edge.litertlm.Conversation
import com.google.ai.edge.litertlm.ConversationConfig
import com.google.ai.edge.litertlm.Engine
import com.google.ai.edge.litertlm.EngineConfig
import com.google.ai.edge.litertlm.OpenApiTool
import com.google.ai.edge.litertlm.tool
import kotlinx.coroutines.channels.awaitClose
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.callbackFlow
import kotlinx.coroutines.launch
import org.edgegemma.core.GemmaFormat
import org.edgegemma.core.Json
import org.edgegemma.core.StreamAssembler
import org.edgegemma.core.ToolCall
import org.edgegemma.core.ToolCallParseException
import org.edgegemma.core.TurnStats
import org.edgegemma.core.TurnTimer
import java.time.ZonedDateTime

/** What one turn streams to the UI. */
sealed class TurnEvent {
    data class Partial(val answer: String, val thinking: String, val toolCallPending: Boolean) : TurnEvent()
    data class ToolCalled(val call: ToolCall) : TurnEvent()
    data class Done(val answer: String, val thinking: String?, val toolCalls: List<ToolCall>, val stats: TurnStats) : TurnEvent()
}

/**
 * One LiteRT-LM engine and conversation over a bundle. Prompt formatting is LiteRT-LM's: it renders the Jinja chat
 * template stored in the `.litertlm` (the one [BundleLoader] checked against the manifest); this class never builds a
 * prompt string itself. Streaming output goes through core's [StreamAssembler] (stop strings, thinking channel,
 * tool-call blocks that reach the text) and [TurnTimer] (TTFT, tok/s).
 *
 * Tool calls: one demo tool, `get_device_time`, is declared to the model. LiteRT-LM parses the model's call and runs
 * [DeviceTools.execute]; the call is shown in the chat. Calls that reach the text stream (a function LiteRT-LM was
 * not given) are parsed by core's [org.edgegemma.core.ToolCallParser], which matches edge-gemma's Python parser.
 */
class LlmSession(bundle: LoadedBundle, cacheDir: String) : AutoCloseable {
    private val engine: Engine
    private val conversation: Conversation
    private var onToolCall: ((ToolCall) -> Unit)? = null
    val manifest = bundle.manifest

    init {
        val m = bundle.manifest
        engine = Engine(
            EngineConfig(
                modelPath = bundle.litertlmPath,
                backend = Backend.CPU(),
                visionBackend = if (m.supportsImage) Backend.CPU() else null,
                audioBackend = if (m.supportsAudio) Backend.CPU() else null,
                maxNumTokens = m.maxNumTokens,
                cacheDir = cacheDir,
            ),
        )
        engine.initialize() // seconds: call off the main thread
        conversation = engine.createConversation(ConversationConfig(tools = listOf(tool(DeviceTools { onToolCall?.invoke(it) }))))
    }

    /** Send one user turn (text, optional JPEG/PNG bytes, optional 16 kHz WAV bytes) and stream the answer. */
    fun send(text: String, image: ByteArray?, audioWav: ByteArray?): Flow<TurnEvent> = callbackFlow {
        val parts = ArrayList<Content>()
        if (image != null) parts.add(Content.ImageBytes(image))
        if (audioWav != null) parts.add(Content.AudioBytes(audioWav))
        if (text.isNotBlank() || parts.isEmpty()) parts.add(Content.Text(text))
        val timer = TurnTimer()
        val assembler = StreamAssembler((GemmaFormat.STOP_STRINGS + manifest.stopTokens).distinct())
        val called = ArrayList<ToolCall>()
        onToolCall = { call ->
            called.add(call)
            trySend(TurnEvent.ToolCalled(call))
        }
        val job = launch {
            try {
                conversation.sendMessageAsync(Contents.of(parts)).collect { message ->
                    val chunk = message.toString()
                    if (chunk.isEmpty() || assembler.stopped) return@collect
                    timer.onToken()
                    val d = assembler.push(chunk)
                    send(TurnEvent.Partial(d.answer, d.thinking, d.toolCallPending))
                    if (assembler.stopped) conversation.cancelProcess()
                }
                val stats = timer.finish()
                val parsed = try {
                    assembler.finish()
                } catch (e: ToolCallParseException) {
                    null
                }
                val answer = parsed?.answer ?: assembler.display().answer
                send(TurnEvent.Done(answer, parsed?.thinking, called + (parsed?.toolCalls ?: emptyList()), stats))
                close()
            } catch (e: Throwable) {
                close(e)
            }
        }
        awaitClose {
            onToolCall = null
            if (job.isActive) {
                conversation.cancelProcess()
                job.cancel()
            }
        }
    }

    override fun close() {
        conversation.close()
        engine.close()
    }
}

/** The demo tool: the device's local time. Every call is reported to [onCall] so the chat shows it. */
private class DeviceTools(private val onCall: (ToolCall) -> Unit) : OpenApiTool {
    override fun getToolDescriptionJsonString(): String =
        """{"name":"get_device_time","description":"Current local date and time on this phone.",""" +
            """"parameters":{"type":"object","properties":{"timezone":{"type":"string","description":"IANA zone, optional"}}}}"""

    override fun execute(paramsJsonString: String): String {
        @Suppress("UNCHECKED_CAST")
        val args = (runCatching { Json.parse(paramsJsonString, "tool arguments") }.getOrNull() as? Map<String, Any?>) ?: emptyMap()
        onCall(ToolCall("get_device_time", args))
        return Json.write(mapOf("now" to ZonedDateTime.now().toString()))
    }
}
