// Pure Kotlin/JVM: no Android, no dependency beyond the Kotlin standard library (CI compiles it with plain kotlinc).
plugins {
    alias(libs.plugins.kotlin.jvm)
}

kotlin {
    jvmToolchain(libs.versions.jvmTarget.get().toInt())
}

dependencies {
    testImplementation(libs.junit)
}
