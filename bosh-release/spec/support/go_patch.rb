# Applies go-patch `replace` and `remove` operations (the ops-file format of the bosh CLI) to a
# manifest, with go-patch's pointer rules: `key`, `key?`, `name=value`, `name=value?`, array
# indices and `-`, where a `?` makes that token and every token after it optional (created when
# missing by a replace, nothing to do for a remove); a last `name=value` or index may carry
# `:before` or `:after` to insert there instead of replacing.
module GoPatch
  class Error < StandardError; end

  Key = Struct.new(:key, :optional)
  Match = Struct.new(:key, :value, :optional, :insert)
  Index = Struct.new(:index, :insert)
  Append = Class.new

  UNESCAPE = { '~0' => '~', '~1' => '/', '~2' => '?', '~3' => '=', '~7' => ':' }.freeze

  def self.apply(document, operations)
    operations.reduce(document) do |doc, op|
      case op['type']
      when 'replace' then replace(doc, op.fetch('path'), op.fetch('value'))
      when 'remove' then remove(doc, op.fetch('path'))
      else raise Error, "unsupported operation type #{op['type'].inspect}"
      end
    end
  end

  def self.parse(path)
    raise Error, "path #{path.inspect} must start with /" unless path.start_with?('/')

    optional = false
    tokens = path.split('/', -1).drop(1).map do |raw|
      raw, modifier = raw.split(':', 2)
      raise Error, "#{path}: only :before and :after are supported here" unless [nil, 'before', 'after'].include?(modifier)

      token = if raw == '-'
                Append.new
              elsif raw =~ /\A\d+\z/
                Index.new(raw.to_i)
              else
                optional ||= raw.end_with?('?')
                text = raw.delete_suffix('?')
                key, value = text.split('=', 2).map { |part| part.gsub(/~[01237]/, UNESCAPE) }
                value.nil? ? Key.new(key, optional) : Match.new(key, value, optional)
              end
      if modifier
        raise Error, "#{path}: :#{modifier} needs an index or name=value" unless token.is_a?(Match) || token.is_a?(Index)

        token.insert = modifier
      end
      token
    end
    raise Error, "#{path}: :before/:after may only end a path" if tokens[0...-1].any? { |t| t.respond_to?(:insert) && t.insert }

    tokens
  end

  def self.replace(document, path, value)
    tokens = parse(path)
    return value if tokens.empty?

    node = document
    tokens.each_cons(2) { |token, after| node = descend(node, token, after, path) }
    assign(node, tokens.last, value, path)
    document
  end

  def self.descend(node, token, after, path)
    case token
    when Key
      raise Error, "#{path}: expected a map at '#{token.key}'" unless node.is_a?(Hash)
      unless node.key?(token.key)
        raise Error, "#{path}: expected to find a map key '#{token.key}'" unless token.optional

        node[token.key] = after.is_a?(Key) ? {} : []
      end
      node[token.key]
    when Match
      found = matches(node, token, path)
      return found.first if found.size == 1

      raise Error, "#{path}: expected exactly one item with #{token.key}=#{token.value}, found #{found.size}" unless found.empty? && token.optional

      item = { token.key => token.value }
      node << item
      item
    when Index
      raise Error, "#{path}: index #{token.index} is out of range" unless node.is_a?(Array) && token.index < node.size

      node[token.index]
    else
      raise Error, "#{path}: '-' may only end a path"
    end
  end

  def self.remove(document, path)
    tokens = parse(path)
    raise Error, 'cannot remove the whole document' if tokens.empty?

    node = document
    tokens[0...-1].each do |token|
      node = step(node, token, path)
      return document if node.nil?
    end
    last = tokens.last
    case last
    when Key
      raise Error, "#{path}: expected a map at '#{last.key}'" unless node.is_a?(Hash)
      raise Error, "#{path}: expected to find a map key '#{last.key}'" unless node.key?(last.key) || last.optional

      node.delete(last.key)
    when Match
      found = matches(node, last, path)
      return document if found.empty? && last.optional
      raise Error, "#{path}: expected exactly one item with #{last.key}=#{last.value}, found #{found.size}" unless found.size == 1

      node.delete_at(node.index { |item| item.equal?(found.first) })
    when Index
      raise Error, "#{path}: index #{last.index} is out of range" unless node.is_a?(Array) && last.index < node.size

      node.delete_at(last.index)
    else
      raise Error, "#{path}: '-' cannot be removed"
    end
    document
  end

  # One step of a remove: nil where an optional token finds nothing (there is then nothing to remove).
  def self.step(node, token, path)
    case token
    when Key
      raise Error, "#{path}: expected a map at '#{token.key}'" unless node.is_a?(Hash)
      raise Error, "#{path}: expected to find a map key '#{token.key}'" unless node.key?(token.key) || token.optional

      node[token.key]
    when Match
      found = matches(node, token, path)
      return nil if found.empty? && token.optional
      raise Error, "#{path}: expected exactly one item with #{token.key}=#{token.value}, found #{found.size}" unless found.size == 1

      found.first
    when Index
      raise Error, "#{path}: index #{token.index} is out of range" unless node.is_a?(Array) && token.index < node.size

      node[token.index]
    else
      raise Error, "#{path}: '-' may only end a path"
    end
  end

  def self.assign(node, token, value, path)
    case token
    when Key
      raise Error, "#{path}: expected a map at '#{token.key}'" unless node.is_a?(Hash)
      raise Error, "#{path}: expected to find a map key '#{token.key}'" unless node.key?(token.key) || token.optional

      node[token.key] = value
    when Match
      found = matches(node, token, path)
      if found.size == 1
        put(node, node.index { |item| item.equal?(found.first) }, token.insert, value)
      elsif found.empty? && token.optional
        node << value
      else
        raise Error, "#{path}: expected exactly one item with #{token.key}=#{token.value}, found #{found.size}"
      end
    when Index
      raise Error, "#{path}: index #{token.index} is out of range" unless node.is_a?(Array) && token.index < node.size

      put(node, token.index, token.insert, value)
    when Append
      raise Error, "#{path}: expected an array before '-'" unless node.is_a?(Array)

      node << value
    end
  end

  def self.put(array, index, insert, value)
    case insert
    when 'before' then array.insert(index, value)
    when 'after' then array.insert(index + 1, value)
    else array[index] = value
    end
  end

  def self.matches(node, token, path)
    raise Error, "#{path}: expected an array at '#{token.key}=#{token.value}'" unless node.is_a?(Array)

    node.select { |item| item.is_a?(Hash) && item[token.key].to_s == token.value }
  end
end
