package org.edgegemma.core

import java.io.File
import kotlin.system.exitProcess

/**
 * Command-line entry for tests/test_android_demo.py's cross-language checks (the JVM side of each comparison):
 *
 *   manifest OUT.json DIR...     validate each artifact's manifest and chat template (as the app does), write a list
 *   index ASSETS_DIR OUT.json    read the bundle index in an assets dir and validate every bundle it lists
 *   responses IN.json OUT.json   parse each model output in IN (a JSON list of strings) like parse_response
 *   wav OUT.wav                  a 48 kHz 440 Hz tone resampled to 16 kHz, as WAV (Python reads it back)
 */
object CrossCheckMain {
    @JvmStatic
    fun main(args: Array<String>) {
        when (args.getOrNull(0)) {
            "manifest" -> File(args[1]).writeText(Json.write(args.drop(2).map { checkArtifact(File(it)) }))
            "index" -> {
                val assets = File(args[1])
                val index = BundleIndex.parse(File(assets, BundleIndex.INDEX_FILE).readText())
                val out = index.bundles.map { b ->
                    refusals {
                        val m = ManifestReader.read(File(assets, b.manifest))
                        ChatTemplateCheck.verify(m, File(assets, b.chatTemplate).readBytes())
                        val bundle = File(assets, b.litertlm)
                        val present = bundle.isFile
                        if (b.litertlmLocation == "assets" && (!present || bundle.length() != m.litertlm.size ||
                                bundle.inputStream().use { Sha256.hex(it) } != m.litertlm.sha256)) {
                            throw IllegalStateException("${bundle.path}: missing or differs from the manifest")
                        }
                        linkedMapOf("ok" to true, "name" to b.name, "location" to b.litertlmLocation, "litertlm_in_assets" to present)
                    }
                }
                File(args[2]).writeText(Json.write(out))
            }
            "responses" -> {
                val inputs = Json.parse(File(args[1]).readText(), args[1]) as List<*>
                val out = inputs.map { text ->
                    try {
                        ToolCallParser.parseResponse(text as String).toJson()
                    } catch (e: ToolCallParseException) {
                        mapOf("error" to "ToolCallParseError")
                    }
                }
                File(args[2]).writeText(Json.write(out))
            }
            "wav" -> {
                val x = FloatArray(48_000) { (0.5 * kotlin.math.sin(2 * Math.PI * 440.0 * it / 48_000)).toFloat() }
                File(args[1]).writeBytes(Pcm.wav(Pcm.resample(x, 48_000, Pcm.TARGET_RATE)))
            }
            else -> {
                System.err.println("usage: CrossCheckMain manifest OUT DIR... | index ASSETS OUT | responses IN OUT | wav OUT")
                exitProcess(2)
            }
        }
    }

    private fun checkArtifact(dir: File): Map<String, Any?> = refusals {
        val m = ManifestReader.read(File(dir, "manifest.json"))
        val template = File(dir, m.chatTemplate.path)
        ChatTemplateCheck.verify(m, template.readBytes(), template.path)
        linkedMapOf(
            "ok" to true, "schema_version" to m.schemaVersion, "name" to m.name,
            "litertlm" to m.litertlm.path, "litertlm_size" to m.litertlm.size, "litertlm_sha256" to m.litertlm.sha256,
            "model_type" to m.modelType, "stop_tokens" to m.stopTokens, "start_token" to m.startToken,
            "max_num_tokens" to m.maxNumTokens, "chat_template" to m.chatTemplate.path,
            "chat_template_sha256" to m.chatTemplate.sha256, "files" to m.files.size,
            "supports_image" to m.supportsImage, "supports_audio" to m.supportsAudio,
        )
    }

    /** The app's refusals (bad manifest, template mismatch) as data, so the Python side can check the message. */
    private fun refusals(body: () -> Map<String, Any?>): Map<String, Any?> = try {
        body()
    } catch (e: IllegalArgumentException) {
        linkedMapOf("ok" to false, "error" to e::class.simpleName, "message" to e.message)
    } catch (e: IllegalStateException) {
        linkedMapOf("ok" to false, "error" to e::class.simpleName, "message" to e.message)
    }
}
