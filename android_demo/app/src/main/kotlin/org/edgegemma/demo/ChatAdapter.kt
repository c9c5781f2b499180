package org.edgegemma.demo

import android.content.Context
import android.view.LayoutInflater
import android.view.View
import android.view.ViewGroup
import android.widget.BaseAdapter
import android.widget.TextView
import org.edgegemma.core.Json
import org.edgegemma.core.ToolCall

/** One row of the chat. A model row is updated in place while it streams. */
data class ChatItem(
    val fromUser: Boolean,
    var text: String,
    var thinking: String = "",
    val toolCalls: MutableList<ToolCall> = ArrayList(),
    var stats: String? = null,
    var error: Boolean = false,
)

class ChatAdapter(private val context: Context) : BaseAdapter() {
    val items = ArrayList<ChatItem>()

    override fun getCount() = items.size
    override fun getItem(position: Int) = items[position]
    override fun getItemId(position: Int) = position.toLong()

    override fun getView(position: Int, convertView: View?, parent: ViewGroup): View {
        val view = convertView ?: LayoutInflater.from(context).inflate(R.layout.item_message, parent, false)
        val item = items[position]
        view.setBackgroundColor(context.getColor(if (item.fromUser) R.color.user_bubble else R.color.model_bubble))
        view.findViewById<TextView>(R.id.role).setText(if (item.fromUser) R.string.role_user else R.string.role_model)
        val text = view.findViewById<TextView>(R.id.text)
        text.text = item.text
        text.setTextColor(context.getColor(if (item.error) R.color.error else android.R.color.black))
        view.findViewById<TextView>(R.id.thinking).show(item.thinking)
        view.findViewById<TextView>(R.id.tools).show(
            item.toolCalls.joinToString("\n") { context.getString(R.string.tool_call, it.name, Json.write(it.arguments)) },
        )
        view.findViewById<TextView>(R.id.stats).show(item.stats ?: "")
        return view
    }

    private fun TextView.show(s: String) {
        text = s
        visibility = if (s.isEmpty()) View.GONE else View.VISIBLE
    }
}
