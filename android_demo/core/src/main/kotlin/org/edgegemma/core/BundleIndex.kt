package org.edgegemma.core

/**
 * The index `make android-bundle` (scripts/android_bundle.py) writes at the top of the app's assets: which artifacts
 * are bundled, where their manifest, chat template and `.litertlm` are, and whether the `.litertlm` is inside the APK
 * (`assets`) or must be pushed to the device with adb (`device`, for files too large for an APK).
 *
 * ```
 * {"index_version": 1,
 *  "bundles": [{"name": "default-int4", "manifest": "default-int4/manifest.json",
 *               "chat_template": "default-int4/tokenizer/chat_template.jinja",
 *               "litertlm": "default-int4/litert/model.litertlm", "litertlm_location": "assets"}]}
 * ```
 * With `litertlm_location` == `device`, `litertlm` is relative to the app's external files directory
 * (`/sdcard/Android/data/<applicationId>/files/`).
 */
data class BundleIndex(val bundles: List<BundleEntry>) {
    fun find(name: String): BundleEntry {
        val names = bundles.joinToString { it.name }.ifEmpty { "none" }
        return bundles.firstOrNull { it.name == name } ?: throw BundleIndexException("$INDEX_FILE: no bundle named '$name' (found: $names)")
    }

    companion object {
        /** File name of the index, at the root of `app/src/main/assets/`. Same constant in scripts/android_bundle.py. */
        const val INDEX_FILE = "edge_gemma_bundles.json"
        const val INDEX_VERSION = 1L
        val LOCATIONS = setOf("assets", "device")

        fun parse(text: String, source: String = INDEX_FILE): BundleIndex {
            val root = Json.parse(text, source) as? Map<*, *> ?: throw BundleIndexException("$source: expected a JSON object")
            val version = root["index_version"]
            if (version != INDEX_VERSION) {
                throw BundleIndexException(
                    "$source: index_version ${Json.write(version)} is not supported (this app reads $INDEX_VERSION); " +
                        "rerun `make android-bundle`",
                )
            }
            val list = root["bundles"] as? List<*> ?: throw BundleIndexException("$source: 'bundles': expected a list")
            val bundles = list.mapIndexed { i, item ->
                val e = item as? Map<*, *> ?: throw BundleIndexException("$source: bundles[$i]: expected an object")
                fun fail(key: String, expected: String, found: String): Nothing =
                    throw BundleIndexException("$source: bundles[$i].$key: expected $expected, found $found")
                fun str(key: String): String = e[key] as? String ?: fail(key, "a string", ManifestReader.kind(e[key]))
                val location = str("litertlm_location")
                if (location !in LOCATIONS) fail("litertlm_location", "one of $LOCATIONS", "'$location'")
                BundleEntry(str("name"), str("manifest"), str("chat_template"), str("litertlm"), location)
            }
            val dup = bundles.groupBy { it.name }.filterValues { it.size > 1 }.keys
            if (dup.isNotEmpty()) throw BundleIndexException("$source: bundle names listed twice: $dup")
            return BundleIndex(bundles)
        }
    }
}

/** One bundled artifact; paths are relative to the assets root (or, for a `device` `.litertlm`, to the external files dir). */
data class BundleEntry(
    val name: String,
    val manifest: String,
    val chatTemplate: String,
    val litertlm: String,
    val litertlmLocation: String,
)

class BundleIndexException(message: String) : IllegalArgumentException(message)
