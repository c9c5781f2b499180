package org.edgegemma.demo

import android.Manifest
import android.annotation.SuppressLint
import android.content.pm.PackageManager
import android.net.Uri
import android.os.Bundle
import android.view.MotionEvent
import android.view.View
import android.widget.Button
import android.widget.EditText
import android.widget.ListView
import android.widget.TextView
import androidx.activity.ComponentActivity
import androidx.activity.result.PickVisualMediaRequest
import androidx.activity.result.contract.ActivityResultContracts
import androidx.lifecycle.lifecycleScope
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.Job
import kotlinx.coroutines.flow.catch
import kotlinx.coroutines.flow.flowOn
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext

/**
 * The chat screen: a message list, a text box, a photo button, hold-to-talk and send. Each answer streams into its
 * row, with the tool calls the model made and the turn's time to first token and tok/s underneath.
 */
class MainActivity : ComponentActivity() {
    private lateinit var status: TextView
    private lateinit var input: EditText
    private lateinit var attachment: TextView
    private lateinit var talk: Button
    private lateinit var adapter: ChatAdapter
    private var session: LlmSession? = null
    private var photo: ByteArray? = null
    private var turn: Job? = null
    private val recorder = VoiceRecorder(onLevel = { level -> runOnUiThread { talk.alpha = 0.5f + minOf(0.5f, level * 5) } })

    private val pickPhoto = registerForActivityResult(ActivityResultContracts.PickVisualMedia()) { uri: Uri? ->
        if (uri != null) {
            photo = contentResolver.openInputStream(uri)?.use { it.readBytes() }
            attachment.text = getString(R.string.photo_attached)
            attachment.visibility = View.VISIBLE
        }
    }

    private val askMic = registerForActivityResult(ActivityResultContracts.RequestPermission()) { granted ->
        if (!granted) status.text = getString(R.string.mic_denied)
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        status = findViewById(R.id.status)
        input = findViewById(R.id.input)
        attachment = findViewById(R.id.attachment)
        talk = findViewById(R.id.talk)
        adapter = ChatAdapter(this)
        findViewById<ListView>(R.id.messages).adapter = adapter
        findViewById<Button>(R.id.send).setOnClickListener { send(input.text.toString(), null) }
        findViewById<Button>(R.id.photo).setOnClickListener {
            if (session?.manifest?.supportsImage == false) status.text = getString(R.string.no_image_support)
            else pickPhoto.launch(PickVisualMediaRequest(ActivityResultContracts.PickVisualMedia.ImageOnly))
        }
        setUpTalkButton()
        loadBundle()
    }

    private fun loadBundle() {
        lifecycleScope.launch {
            try {
                val loader = BundleLoader(this@MainActivity)
                val entry = withContext(Dispatchers.IO) { loader.index() }.bundles.first()
                status.text = getString(R.string.loading_bundle, entry.name)
                val s = withContext(Dispatchers.IO) {
                    try {
                        LlmSession(loader.load(entry), cacheDir.path)
                    } catch (e: MissingModelFileException) {
                        throw IllegalStateException(getString(R.string.missing_device_file, BundleLoader.devicePath(this@MainActivity, entry)))
                    }
                }
                session = s
                val m = s.manifest
                status.text = getString(R.string.ready, entry.name, "${m.maxNumTokens} tokens" +
                    (if (m.supportsImage) " · image" else "") + (if (m.supportsAudio) " · audio" else ""))
            } catch (e: Exception) {
                // Refused bundles (schema, backend, template hash...) land here with core's message.
                status.text = e.message ?: e.toString()
            }
        }
    }

    @SuppressLint("ClickableViewAccessibility")
    private fun setUpTalkButton() {
        talk.setOnTouchListener { _, event ->
            when (event.action) {
                MotionEvent.ACTION_DOWN -> {
                    if (session?.manifest?.supportsAudio == false) {
                        status.text = getString(R.string.no_audio_support)
                    } else if (checkSelfPermission(Manifest.permission.RECORD_AUDIO) != PackageManager.PERMISSION_GRANTED) {
                        askMic.launch(Manifest.permission.RECORD_AUDIO)
                    } else {
                        try {
                            recorder.start()
                            status.text = getString(R.string.recording)
                        } catch (e: IllegalStateException) {
                            status.text = e.message ?: e.toString()
                        }
                    }
                    true
                }
                MotionEvent.ACTION_UP, MotionEvent.ACTION_CANCEL -> {
                    talk.alpha = 1f
                    val wav = recorder.stop()
                    if (wav != null) send(input.text.toString(), wav)
                    true
                }
                else -> false
            }
        }
    }

    private fun send(text: String, audioWav: ByteArray?) {
        val s = session ?: return
        if (turn?.isActive == true) return
        if (text.isBlank() && photo == null && audioWav == null) return
        val label = listOfNotNull(text.ifBlank { null }, photo?.let { "[photo]" }, audioWav?.let { "[voice]" }).joinToString(" ")
        adapter.items.add(ChatItem(fromUser = true, text = label))
        val reply = ChatItem(fromUser = false, text = "")
        adapter.items.add(reply)
        adapter.notifyDataSetChanged()
        val image = photo
        photo = null
        attachment.visibility = View.GONE
        input.text.clear()
        turn = lifecycleScope.launch {
            s.send(text, image, audioWav)
                .flowOn(Dispatchers.Default)
                .catch { e ->
                    reply.text = (reply.text + "\n" + (e.message ?: e.toString())).trim()
                    reply.error = true
                }
                .collect { ev ->
                    when (ev) {
                        is TurnEvent.Partial -> {
                            reply.text = ev.answer
                            reply.thinking = ev.thinking
                        }
                        is TurnEvent.ToolCalled -> reply.toolCalls.add(ev.call)
                        is TurnEvent.Done -> {
                            reply.text = ev.answer
                            reply.thinking = ev.thinking ?: ""
                            for (c in ev.toolCalls) if (c !in reply.toolCalls) reply.toolCalls.add(c)
                            reply.stats = ev.stats.summary()
                        }
                    }
                    adapter.notifyDataSetChanged()
                }
            adapter.notifyDataSetChanged()
        }
    }

    override fun onDestroy() {
        turn?.cancel()
        session?.close()
        super.onDestroy()
    }
}
