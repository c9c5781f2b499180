package org.edgegemma.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertThrows
import org.junit.Assert.assertTrue
import org.junit.Test

class ManifestTest {
    private val template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}".toByteArray()
    private val templateSha = Sha256.hex(template)

    /** A minimal manifest in the exporter's layout; [edit] changes the parsed tree before it is written back. */
    private fun manifest(edit: (MutableMap<String, Any?>) -> Unit = {}): String {
        val m = Json.parse(
            """
            {"schema_version": 1, "name": "tiny",
             "model": {"config": {"text": {}, "vision": {"hidden_size": 8}, "audio": null}},
             "tokenizer": {"dir": "tokenizer", "chat_template": "tokenizer/chat_template.jinja"},
             "backends": {"litert": {"files": {"litertlm": "litert/model.litertlm", "decoder": "litert/decoder.tflite"},
                                     "litertlm": {"model_type": "gemma4", "stop_tokens": ["<eos>", "<turn|>"],
                                                  "start_token": "<bos>", "max_num_tokens": 256}}},
             "files": [{"path": "litert/model.litertlm", "size": 10, "sha256": "${"a".repeat(64)}"},
                       {"path": "tokenizer/chat_template.jinja", "size": ${template.size}, "sha256": "$templateSha"}]}
            """,
        )
        @Suppress("UNCHECKED_CAST")
        val tree = deepCopy(m) as MutableMap<String, Any?>
        edit(tree)
        return Json.write(tree)
    }

    private fun deepCopy(v: Any?): Any? = when (v) {
        is Map<*, *> -> LinkedHashMap<String, Any?>().also { out -> v.forEach { (k, x) -> out[k as String] = deepCopy(x) } }
        is List<*> -> v.mapTo(ArrayList()) { deepCopy(it) }
        else -> v
    }

    @Suppress("UNCHECKED_CAST")
    private fun MutableMap<String, Any?>.obj(vararg keys: String): MutableMap<String, Any?> =
        keys.fold(this) { acc, k -> acc[k] as MutableMap<String, Any?> }

    private fun refused(expected: String, edit: (MutableMap<String, Any?>) -> Unit) {
        val e = assertThrows(ManifestException::class.java) { ManifestReader.parse(manifest(edit), "bundle/manifest.json") }
        assertTrue("'${e.message}' should contain '$expected'", e.message!!.contains(expected))
        assertTrue(e.message!!.startsWith("bundle/manifest.json: "))
    }

    @Test
    fun readsAValidManifest() {
        val m = ManifestReader.parse(manifest())
        assertEquals(1, m.schemaVersion)
        assertEquals("tiny", m.name)
        assertEquals("litert/model.litertlm", m.litertlm.path)
        assertEquals(listOf("<eos>", "<turn|>"), m.stopTokens)
        assertEquals("<bos>", m.startToken)
        assertEquals(256, m.maxNumTokens)
        assertTrue(m.supportsImage)
        assertFalse(m.supportsAudio)
        ChatTemplateCheck.verify(m, template)
    }

    @Test
    fun refusesAnotherSchemaVersion() = refused("schema_version 2 is not supported by this app (it reads version 1)") { it["schema_version"] = 2L }

    @Test
    fun refusesAnArtifactWithoutLitert() = refused("backends has no 'litert' entry (found: onnx)") {
        it["backends"] = mapOf("onnx" to mapOf<String, Any?>())
    }

    @Test
    fun refusesANonLitertlmBundle() = refused("expected a .litertlm file, found 'litert/decoder.tflite'") {
        it.obj("backends", "litert", "files")["litertlm"] = "litert/decoder.tflite"
    }

    @Test
    fun refusesAnUnlistedBundleFile() = refused("litertlm: expected a file listed in 'files', found 'litert/other.litertlm'") {
        it.obj("backends", "litert", "files")["litertlm"] = "litert/other.litertlm"
    }

    @Test
    fun refusesAnotherModelType() = refused("model_type: expected 'gemma4', found 'gemma3'") {
        it.obj("backends", "litert", "litertlm")["model_type"] = "gemma3"
    }

    @Test
    fun refusesAMissingChatTemplate() = refused("tokenizer.chat_template: expected the path of chat_template.jinja, found null") {
        it.obj("tokenizer")["chat_template"] = null
    }

    @Test
    fun refusesBadFileEntries() {
        refused("files[1].sha256 (tokenizer/chat_template.jinja): expected 64 lowercase hex digits") {
            @Suppress("UNCHECKED_CAST")
            ((it["files"] as MutableList<Any?>)[1] as MutableMap<String, Any?>)["sha256"] = "XYZ"
        }
        refused("files[0].path: expected a relative path inside the artifact, found '../x'") {
            @Suppress("UNCHECKED_CAST")
            ((it["files"] as MutableList<Any?>)[0] as MutableMap<String, Any?>)["path"] = "../x"
        }
    }

    @Test
    fun chatTemplateMismatchNamesBothHashes() {
        val m = ManifestReader.parse(manifest())
        val edited = template.copyOf().also { it[0] = 'X'.code.toByte() }
        val e = assertThrows(ChatTemplateMismatchException::class.java) { ChatTemplateCheck.verify(m, edited) }
        assertTrue(e.message!!, e.message!!.contains(templateSha) && e.message!!.contains(Sha256.hex(edited)))
        assertThrows(ChatTemplateMismatchException::class.java) { ChatTemplateCheck.verify(m, template + byteArrayOf(10)) }
    }

    @Test
    fun sha256MatchesTheStandardTestVector() {
        assertEquals("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", Sha256.hex("abc".toByteArray()))
        assertEquals(Sha256.hex("abc".toByteArray()), Sha256.hex("abc".byteInputStream()))
    }

    @Test
    fun bundleIndexIsReadAndValidated() {
        val text = """{"index_version": 1, "bundles": [{"name": "a", "manifest": "a/manifest.json",
            "chat_template": "a/tokenizer/chat_template.jinja", "litertlm": "a/litert/model.litertlm", "litertlm_location": "device"}]}"""
        val idx = BundleIndex.parse(text)
        assertEquals("device", idx.find("a").litertlmLocation)
        assertThrows(BundleIndexException::class.java) { idx.find("b") }
        assertThrows(BundleIndexException::class.java) { BundleIndex.parse(text.replace("\"device\"", "\"cloud\"")) }
        assertThrows(BundleIndexException::class.java) { BundleIndex.parse(text.replace("\"index_version\": 1", "\"index_version\": 2")) }
    }
}
