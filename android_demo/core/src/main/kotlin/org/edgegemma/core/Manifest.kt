package org.edgegemma.core

import java.io.File
import java.io.InputStream
import java.security.MessageDigest

/**
 * The parts of an edge-gemma artifact's `manifest.json` (schema in `edge_gemma/artifact.py`) that the app needs,
 * validated before anything is loaded, so that a bundle this app cannot run is refused with a message that names the
 * field, what was expected and what was found, instead of failing later inside LiteRT-LM's native code.
 *
 * Requirements: `schema_version` == [SUPPORTED_SCHEMA_VERSION]; a `backends.litert` entry whose `files.litertlm` is a
 * `.litertlm` file listed (with size and sha256) in `files`; its `litertlm.model_type` is `gemma4`; the tokenizer's
 * `chat_template` file is listed too (the app checks its sha256, see [ChatTemplateCheck]).
 */
data class ArtifactManifest(
    val schemaVersion: Int,
    val name: String?,
    val files: Map<String, FileEntry>,
    val litertlm: FileEntry,
    val modelType: String,
    val stopTokens: List<String>,
    val startToken: String?,
    val maxNumTokens: Int,
    val chatTemplate: FileEntry,
    val supportsImage: Boolean,
    val supportsAudio: Boolean,
)

/** One file of the artifact: path relative to the artifact root ('/'-separated), size in bytes, sha256 hex. */
data class FileEntry(val path: String, val size: Long, val sha256: String)

/** A manifest this app cannot use; the message names the manifest, the field, expected and found. */
class ManifestException(message: String) : IllegalArgumentException(message)

object ManifestReader {
    /** The artifact schema this app reads: `SCHEMA_VERSION` in edge_gemma/artifact.py. */
    const val SUPPORTED_SCHEMA_VERSION = 1
    const val BACKEND = "litert"
    const val MODEL_TYPE = "gemma4"

    private val SHA256_RE = Regex("[0-9a-f]{64}")

    fun read(file: File): ArtifactManifest = parse(file.readText(), file.path)

    /** Parse and validate manifest JSON text; [source] names it in errors (a path, or an asset name). */
    fun parse(text: String, source: String = "manifest.json"): ArtifactManifest {
        val f = Fields(source)
        val root = Json.parse(text, source) as? Map<*, *>
            ?: throw ManifestException("$source: expected a JSON object at the top level")
        val version = root["schema_version"]
        if (version !is Long || version != SUPPORTED_SCHEMA_VERSION.toLong()) {
            throw ManifestException(
                "$source: schema_version ${Json.write(version)} is not supported by this app (it reads version " +
                    "$SUPPORTED_SCHEMA_VERSION); re-export the artifact with a matching edge-gemma or update the app",
            )
        }
        val files = readFiles(root["files"], f)
        val backends = f.obj(root, "backends", "backends")
        val litert = backends[BACKEND] as? Map<*, *> ?: throw ManifestException(
            "$source: backends has no '$BACKEND' entry (found: ${backends.keys.joinToString().ifEmpty { "none" }}); " +
                "this app runs the LiteRT-LM bundle: re-export with `edge-gemma export ... --backends litert`",
        )
        val litertFiles = f.obj(litert, "files", "backends.litert.files")
        val bundlePath = f.str(litertFiles, "litertlm", "backends.litert.files.litertlm")
        if (!bundlePath.endsWith(".litertlm")) f.fail("backends.litert.files.litertlm", "a .litertlm file", "'$bundlePath'")
        val bundle = files[bundlePath] ?: f.fail("backends.litert.files.litertlm", "a file listed in 'files'", "'$bundlePath'")
        val meta = f.obj(litert, "litertlm", "backends.litert.litertlm")
        val modelType = f.str(meta, "model_type", "backends.litert.litertlm.model_type")
        if (modelType != MODEL_TYPE) f.fail("backends.litert.litertlm.model_type", "'$MODEL_TYPE'", "'$modelType'")
        val stopsField = "backends.litert.litertlm.stop_tokens"
        val stops = (meta["stop_tokens"] as? List<*>)?.map { it as? String ?: f.fail(stopsField, "strings", kind(it)) }
            ?: f.fail(stopsField, "a list", kind(meta["stop_tokens"]))
        if (stops.isEmpty()) f.fail(stopsField, "at least one stop token", "none")
        val maxField = "backends.litert.litertlm.max_num_tokens"
        val maxTokens = meta["max_num_tokens"] as? Long ?: f.fail(maxField, "an integer", kind(meta["max_num_tokens"]))
        if (maxTokens < 2 || maxTokens > Int.MAX_VALUE) f.fail(maxField, ">= 2", "$maxTokens")
        val tokenizer = f.obj(root, "tokenizer", "tokenizer")
        val templatePath = tokenizer["chat_template"] as? String ?: f.fail(
            "tokenizer.chat_template", "the path of chat_template.jinja",
            "${kind(tokenizer["chat_template"])}; the app checks the bundle's chat template against this file's sha256",
        )
        val template = files[templatePath]
            ?: f.fail("tokenizer.chat_template", "a file listed in 'files'", "'$templatePath'")
        val config = ((root["model"] as? Map<*, *>)?.get("config")) as? Map<*, *>
        return ArtifactManifest(
            schemaVersion = version.toInt(),
            name = root["name"] as? String,
            files = files,
            litertlm = bundle,
            modelType = modelType,
            stopTokens = stops,
            startToken = meta["start_token"] as? String,
            maxNumTokens = maxTokens.toInt(),
            chatTemplate = template,
            supportsImage = config?.get("vision") != null,
            supportsAudio = config?.get("audio") != null,
        )
    }

    private fun readFiles(value: Any?, f: Fields): Map<String, FileEntry> {
        val list = value as? List<*> ?: f.fail("files", "a list", kind(value))
        val out = LinkedHashMap<String, FileEntry>()
        for ((i, item) in list.withIndex()) {
            val e = item as? Map<*, *> ?: f.fail("files[$i]", "an object", kind(item))
            val path = f.str(e, "path", "files[$i].path")
            if (path.startsWith("/") || path.split('/').any { it == ".." || it.isEmpty() }) {
                f.fail("files[$i].path", "a relative path inside the artifact", "'$path'")
            }
            val size = e["size"] as? Long ?: f.fail("files[$i].size ($path)", "an integer", kind(e["size"]))
            if (size < 0) f.fail("files[$i].size ($path)", ">= 0", "$size")
            val sha = f.str(e, "sha256", "files[$i].sha256 ($path)")
            if (!SHA256_RE.matches(sha)) f.fail("files[$i].sha256 ($path)", "64 lowercase hex digits", "'$sha'")
            if (out.put(path, FileEntry(path, size, sha)) != null) f.fail("files", "each path once", "'$path' twice")
        }
        return out
    }

    /** Typed field access whose errors read "SOURCE: FIELD: expected X, found Y". */
    private class Fields(val source: String) {
        fun fail(field: String, expected: String, found: String): Nothing =
            throw ManifestException("$source: $field: expected $expected, found $found")

        fun obj(m: Map<*, *>, key: String, field: String): Map<*, *> = m[key] as? Map<*, *> ?: fail(field, "an object", kind(m[key]))

        fun str(m: Map<*, *>, key: String, field: String): String = m[key] as? String ?: fail(field, "a string", kind(m[key]))
    }

    internal fun kind(v: Any?): String = when (v) {
        null -> "null"
        is String -> "string '${v.take(40)}'"
        is Map<*, *> -> "an object"
        is List<*> -> "a list"
        is Boolean -> "boolean $v"
        else -> "number $v"
    }
}

/** sha256 of bytes or a stream, as lowercase hex (the manifest's format). */
object Sha256 {
    fun hex(bytes: ByteArray): String = toHex(MessageDigest.getInstance("SHA-256").digest(bytes))

    fun hex(stream: InputStream): String {
        val md = MessageDigest.getInstance("SHA-256")
        val buf = ByteArray(1 shl 16)
        while (true) {
            val n = stream.read(buf)
            if (n < 0) break
            md.update(buf, 0, n)
        }
        return toHex(md.digest())
    }

    private fun toHex(digest: ByteArray) = digest.joinToString("") { "%02x".format(it.toInt() and 0xff) }
}

/** The bundle's chat template differs from the one the manifest names. */
class ChatTemplateMismatchException(message: String) : IllegalStateException(message)

/**
 * Checks that the chat template shipped with a bundle is the one its manifest names, by sha256 and size.
 *
 * The app never formats prompts itself: LiteRT-LM renders the Jinja template stored in the `.litertlm`. Our exporter
 * writes that same file into the bundle and the manifest, so a mismatch means the bundle was assembled from different
 * exports (or edited), and the prompts LiteRT-LM builds would not be the ones the model was exported and checked with.
 */
object ChatTemplateCheck {
    fun verify(manifest: ArtifactManifest, template: ByteArray, source: String = manifest.chatTemplate.path) {
        val entry = manifest.chatTemplate
        if (template.size.toLong() != entry.size) {
            throw ChatTemplateMismatchException("$source: ${template.size} bytes, but the manifest lists ${entry.path} with ${entry.size} bytes")
        }
        val found = Sha256.hex(template)
        if (found != entry.sha256) {
            throw ChatTemplateMismatchException("$source: sha256 $found differs from the manifest's ${entry.sha256} for ${entry.path}")
        }
    }
}
